"""The README's "Federate your own Hugging Face model" section, executed as written.

The commands are read from README.md's own text: the first ``bash`` block under that heading. Only
its documented settings lines are substituted — ``D=`` (a temporary folder), ``PORT=`` and
``NODE_PORT=`` (free ports) and ``DTYPE=`` — and the block runs in one ``bash -eu`` from the
repository root: a small Llama saved in that dtype by ``examples/hf_lora/make_model.py``, ``fedmerge
init``, ``fedmerge certs``, ``fedmerge serve`` (TLS, node authentication), the connection and the
registration of the three keys, three ``flower-supernode`` processes on their own ports, ``flwr run
examples/hf_lora`` (LoRA, TIES, federated evaluation after each round), ``fedmerge store
export`` and ``from_pretrained``. The run is ended only when it stops making progress
(``fedmerge_testing/progress.py``: its output, the store, the SuperNodes' logs). Then the test checks
what a user would rely on: every round committed with the three institutions accepted, the version's
weights in the base's dtype, evaluations recorded, the export loading with transformers in that dtype
and generating, the peft export matching it.

Every process of the run carries a marker in its environment; at teardown each one still alive is
ended by its pid, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from fedmerge.store import ModelStore
from fedmerge_testing.processes import end_processes

sys.path.insert(0, str(Path(__file__).parent))

from test_deployment import BIN, ROOT, deployment_env, free_port

from fedmerge_testing.progress import run_watched

SECTION = "## Federate your own Hugging Face model"
SETTINGS = ("D", "PORT", "NODE_PORT", "DTYPE")
MARKER = "FEDMERGE_README_RUN"


def readme_block(readme: Path = ROOT / "README.md") -> str:
    """The first ```bash block after the section's heading (AssertionError if the README lost it)."""
    text = readme.read_text()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    after = text[text.index(SECTION) + len(SECTION) :]
    found = re.search(r"^```bash\n(.*?)^```", after, flags=re.S | re.M)
    assert found is not None, f"no ```bash block under {SECTION!r}"
    return found.group(1)


def with_settings(block: str, **values: str) -> str:
    """``block`` with each settings line ``NAME=value  # comment`` given ``values[NAME]``; every setting
    must be present exactly once as such a line (so the README cannot drift from what is substituted)."""
    for name, value in values.items():
        pattern = re.compile(rf"^{name}=\S+", flags=re.M)
        assert len(pattern.findall(block)) == 1, f"README block has no single settings line {name}=…"
        line = f"{name}={value}"
        block = pattern.sub(lambda _, line=line: line, block)  # type: ignore[misc]
    return block


def _marked(value: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(MARKER) == value:
                found.append(proc)
    return found


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    end_processes(_marked(str(tmp_path)), grace_s=15)


def run_readme(tmp_path: Path, dtype: str) -> tuple[Path, str]:
    """Run the README block with its settings pointed at ``tmp_path``; returns (D, its output)."""
    d = tmp_path / "deployment"
    script = with_settings(
        readme_block(), D=str(d), PORT=str(free_port()), NODE_PORT=str(free_port()), DTYPE=dtype
    )
    env, _ = deployment_env(tmp_path)
    env.pop("FLWR_HOME")  # the block sets its own
    env[MARKER] = str(tmp_path)
    # progress: the block's own trace and output, the store, the SuperNodes' logs (not serve.log, which
    # grows with every poll of the SuperLink)
    node_logs = [d / "logs" / f"supernode-{i}.log" for i in (1, 2, 3)]
    result = run_watched(
        ["bash", "-eux", "-c", script], cwd=ROOT, env=env, idle_s=300, watch=[d / "store", *node_logs],
        merge_stderr=True, output_file=tmp_path / "readme-run.log",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + logs_tail(d)
    return d, result.stdout


def logs_tail(d: Path) -> str:
    """The end of each log the README block wrote (the SuperLink's holds the ServerApp's lines)."""
    return "".join(f"\n--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted((d / "logs").glob("*.log")))


def check_federation(d: Path, output: str, dtype: torch.dtype, rounds: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedmerge.store.evaluations import evaluations_of

    with ModelStore.open(d / "store") as st:
        versions = sorted((v for v in st.list() if v.round is not None), key=lambda v: v.round or 0)
        assert [v.round for v in versions] == list(range(1, rounds + 1)), output[-4000:] + logs_tail(d)
        for version in versions:
            assert version.method == "ties"
            accepted = sorted(c.client_id for c in version.contributors if c.accepted)
            assert accepted == ["inst-1", "inst-2", "inst-3"], version.contributors
            evaluations = evaluations_of(st, version.id)
            assert evaluations, f"no federated evaluation recorded for {version.id}"
            assert sorted(n.client_id for n in evaluations[-1].accepted) == ["inst-1", "inst-2", "inst-3"]
            assert "loss" in evaluations[-1].metrics
        weights = st.materialize(versions[-1])
        floating = {t.dtype for t in weights.values() if t.is_floating_point()}
        assert floating == {dtype}, f"version weights in {floating}, base in {dtype}"
        assert st.verify().ok
        metrics = dict(versions[-1].metrics)
    print(json.dumps({"dtype": str(dtype), "uplink_bytes": metrics.get("uplink-bytes"),
                      "uplink_dense_bytes": metrics.get("uplink-dense-bytes"),
                      "downlink_bytes": metrics.get("downlink-bytes")}))  # fmt: skip

    merged = d / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert f"{dtype}" in output  # the README's last python line printed the loaded dtype
    assert model.dtype == dtype
    base = AutoModelForCausalLM.from_pretrained(d / "my-lm")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[q], base.state_dict()[q])  # the federation changed it
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(model.state_dict()[k], base.state_dict()[k])  # LoRA touched only q and v
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = model.generate(**tokenizer("the server", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    text = str(tokenizer.decode(ids[0], skip_special_tokens=True))
    assert text.startswith("the server") and len(text) > len("the server")


def test_readme_settings_are_substitutable() -> None:
    block = readme_block()
    out = with_settings(block, D="/x", PORT="1", NODE_PORT="2", DTYPE="float16")
    assert "\nD=/x" in "\n" + out and "--dtype $DTYPE" in out and "flwr run examples/hf_lora" in out
    for step in ("fedmerge init", "fedmerge certs", "fedmerge serve", "register-supernodes.sh",
                 "flower-supernode", "flwr run", "fedmerge store export", "from_pretrained"):  # fmt: skip
        assert step in block, step
    assert block.index("fedmerge certs") < block.index("fedmerge serve") < block.index("flwr run")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(0)  # bounded by observed progress (run_watched), not by a wall-clock guess
def test_readme_deployment_bf16_tls_node_auth_evaluate_export(run_dir: Path) -> None:
    d, output = run_readme(run_dir, "bfloat16")
    check_federation(d, output, torch.bfloat16, rounds=2)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = d / "adapter"
    exported = run_watched(
        [str(BIN / "fedmerge"), "store", "export", "latest", "--store", str(d / "store"),
         "--out", str(adapter), "--format", "peft"],
        cwd=ROOT, env=dict(os.environ), idle_s=120,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stdout + exported.stderr
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d / "my-lm"), adapter)
    merged = peft_model.merge_and_unload()
    model = AutoModelForCausalLM.from_pretrained(d / "merged")
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged.state_dict()[q], model.state_dict()[q], atol=1e-2, rtol=1e-2)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(0)  # bounded by observed progress (run_watched), not by a wall-clock guess
def test_readme_deployment_fp16(run_dir: Path) -> None:
    d, output = run_readme(run_dir, "float16")
    check_federation(d, output, torch.float16, rounds=2)
