"""One real federation end to end, as a user would run it.

A small causal LM is built from a config with a BPE tokenizer trained locally (``tokenizers``; nothing
downloaded) and saved as a Hugging Face directory; ``fedmerge init`` makes it the store's root; a
``flower-superlink`` with TLS and SuperNode authentication and three ``flower-supernode`` processes
run, each with its own private text file (``data-path``) and the model directory (``model-dir``);
``flwr run examples/hf_lora`` runs TIES rounds of LoRA fine-tuning with the worked-example ClientApp;
``fedmerge store export`` writes the latest version, which transformers loads and generates text with
(and the peft export loads with ``PeftModel.from_pretrained`` on the base).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from fedmerge.store import ModelStore

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "hf_lora"))

from test_deployment import (
    BIN,
    ROOT,
    Deployment,
    deployment,  # noqa: F401  (fixture)
    run_flwr,
    start_secure_federation,
)
from test_hf_lora_example import write_corpora

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROUNDS = 2


def _run(dep: Deployment, argv: list[str], timeout: float) -> str:
    import subprocess

    out = subprocess.run(
        argv, cwd=ROOT, env=dep.env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_hf_lora_federation_with_tls_node_auth_and_export(tmp_path: Path, deployment: Deployment) -> None:  # noqa: F811
    from make_model import make_model

    corpora = write_corpora(tmp_path, lines=32)
    model_dir = make_model(tmp_path / "my-lm", corpora)
    store = tmp_path / "store"
    _run(deployment, [str(BIN / "fedmerge"), "init", "--store", str(store), "--base", str(model_dir)], 120)

    start_secure_federation(
        deployment,
        tmp_path,
        [f"model-dir='{model_dir}' data-path='{corpora[i]}' client-id='inst-{i}'" for i in range(3)],
    )
    run_config = (
        f"store='{store}' num-rounds={ROUNDS} min-clients=3 min-valid=3 aggregator='ties' "
        "local-epochs=2 lr=0.01 lora-rank=4 lora-alpha=8.0"
    )
    t0 = time.perf_counter()
    result = run_flwr(deployment, ["run", "examples/hf_lora", "--stream", "--run-config", run_config], 540)
    wall = time.perf_counter() - t0
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + deployment.tail()

    with ModelStore.open(store) as st:
        rounds = sorted((v.round, v.id) for v in st.list() if v.round is not None)
        assert [r for r, _ in rounds] == list(range(1, ROUNDS + 1)), result.stdout[-3000:] + deployment.tail()
        for _, vid in rounds:
            version = st.get(vid)
            assert version.method == "ties"
            assert sorted(c.client_id for c in version.contributors if c.accepted) == [
                "inst-0",
                "inst-1",
                "inst-2",
            ]
            assert all(c.codec and c.codec["format"] == "fedmerge-delta-v1" for c in version.contributors)
        latest = st.get("latest")
        metrics = dict(latest.metrics)
        assert st.verify().ok
    lora_factor_bytes = 4 * 2 * 2 * 4 * 64 * 2  # fp32 × (q, v) × 2 layers × (A: r×64 + B: 64×r) per client
    print(json.dumps({"wall_s": wall, "rounds": ROUNDS,
                      "uplink_bytes_per_client": metrics["uplink-bytes"] / 3,
                      "dense_fp32_delta_bytes_per_client": metrics["uplink-dense-bytes"] / 3,
                      "dense_fp32_lora_factor_bytes_per_client": lora_factor_bytes,
                      "downlink_bytes": metrics["downlink-bytes"]}))  # fmt: skip

    out = tmp_path / "merged"
    _run(
        deployment,
        [str(BIN / "fedmerge"), "store", "export", "latest", "--store", str(store), "--out", str(out)],
        120,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[q], base.state_dict()[q])  # the federation changed it
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(model.state_dict()[k], base.state_dict()[k])  # LoRA touched only q and v
    torch.manual_seed(0)
    ids = model.generate(**tokenizer("the river", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert text.startswith("the river") and len(text) > len("the river")

    adapter = tmp_path / "adapter"
    _run(deployment, [str(BIN / "fedmerge"), "store", "export", "latest", "--store", str(store), "--out",
                      str(adapter), "--format", "peft"], 120)  # fmt: skip
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged.state_dict()[q], model.state_dict()[q], atol=1e-4, rtol=1e-4)
