"""A Hugging Face model saved in bf16 (and fp16) through the server side end to end: ``fedmerge init``
of its directory, a round of plain Flower clients (base widened to fp32 in ``"arrays"``, fp32
replies), the committed version in the base's dtype, an export ``from_pretrained`` loads in that
dtype, and the dashboard pages of the version. A bf16 checkpoint whose ``config.json`` says float16
is refused in one line. Models are built from a config with transformers; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fedmerge.flower.config import parse_run_config  # noqa: E402
from fedmerge.flower.records import DTYPES_RECORD, dtypes_of, narrow_from_numpy  # noqa: E402
from fedmerge.flower.server.federation import Federation  # noqa: E402
from fedmerge.store import ModelStore  # noqa: E402
from fedmerge.store.export import export_safetensors  # noqa: E402
from fedmerge.store.init import DtypeMismatchError, init_store  # noqa: E402
from fedmerge_simulations.secagg import InProcessGrid  # noqa: E402

pytestmark = pytest.mark.usefixtures("server_identity")


def save_llama(directory: Path, dtype: torch.dtype) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(str(directory))
    return model


def _step(node: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(node * 7919 + sum(map(ord, name)))
    return 1e-2 * torch.randn(shape, generator=g)


def plain_app() -> Any:
    """Flower's API only: the weights from "arrays" (narrowed back with "fedmerge.dtypes", as a careful
    client would), a fixed step in fp32, fp32 weights replied (a client that trains in fp32)."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        weights = {k: torch.from_numpy(a.numpy().copy()) for k, a in arrays.items()}
        weights = narrow_from_numpy(
            weights, dtypes_of(msg.content.config_records.get(DTYPES_RECORD), weights)
        )
        out = {k: (w.float() + _step(context.node_id, k, tuple(w.shape))).numpy() for k, w in weights.items()}
        content = RecordDict(
            {"arrays": ArrayRecord({k: Array(v) for k, v in out.items()}),
             "metrics": MetricRecord({"num-examples": 10})}
        )  # fmt: skip
        return Message(content, reply_to=msg)

    return app


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_half_precision_hf_model_federates_and_exports_in_its_dtype(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    model_dir = tmp_path / "model"
    original = save_llama(model_dir, dtype)
    store_dir = tmp_path / "store"
    root = init_store(store_dir, model_dir).root
    cfg = parse_run_config(
        {"store": str(store_dir), "task": "hf_causal_lm", "aggregator": "fedavg", "min-clients": 3,
         "min-valid": 3, "num-rounds": 1, "server-eval": False, "init-base": False, "wait-for-nodes-s": 0.0}
    )  # fmt: skip
    with ModelStore.open(store_dir) as store:
        base = store.materialize(root)
        assert {t.dtype for t in base.values() if t.is_floating_point()} == {dtype}
        (report,) = Federation(InProcessGrid(plain_app(), 3), cfg, store).run()
        assert report.version_id is not None and len(report.accepted) == 3, report.outcomes
        merged = store.materialize(store.get(report.version_id))
        for name, tensor in base.items():
            mean = sum(_step(node, name, tuple(tensor.shape)) for node in (1000, 1001, 1002)) / 3
            assert merged[name].dtype == dtype
            # within one rounding of the base dtype (the fp32 sums may differ in their last bit)
            torch.testing.assert_close(merged[name], (tensor.float() + mean).to(dtype))
        export_safetensors(store, report.version_id, tmp_path / "export")
    exported = tmp_path / "export"
    declared = json.loads((exported / "config.json").read_text())
    assert declared.get("torch_dtype", declared.get("dtype")) == dtype_name(dtype)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(exported), dtype=dtype)
    state = loaded.state_dict()
    for name, tensor in merged.items():
        assert state[name].dtype == dtype and torch.equal(state[name], tensor), name
    assert not torch.equal(state["lm_head.weight"], original.state_dict()["lm_head.weight"])
    # the dashboard renders the version list and the new version's page
    from starlette.testclient import TestClient

    from fedmerge.dashboard import build_app

    with TestClient(build_app(store_dir, "127.0.0.1"), base_url="http://127.0.0.1") as client:
        assert client.get("/").status_code == 200
        page = client.get(f"/versions/{report.version_id}")
        assert page.status_code == 200 and report.version_id in page.text


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def test_a_bf16_checkpoint_whose_config_says_float16_is_one_clear_line(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    save_llama(model_dir, torch.bfloat16)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "float16"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(DtypeMismatchError) as info:
        init_store(tmp_path / "store", model_dir)
    message = str(info.value)
    assert "says torch_dtype 'float16' but the weights are" in message and "bfloat16" in message
    assert "set its torch_dtype to 'bfloat16'" in message
    assert not (tmp_path / "store").exists()  # refused before anything was written
    from fedmerge.cli import app

    result = CliRunner().invoke(app, ["init", "--store", str(tmp_path / "s2"), "--base", str(model_dir)])
    assert result.exit_code == 1
    text = " ".join(result.output.split())  # one message (a narrow terminal may wrap it), no traceback
    assert text.startswith("error: ") and "says torch_dtype 'float16'" in text and "Traceback" not in text
