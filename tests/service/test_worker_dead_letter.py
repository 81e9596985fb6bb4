"""The merge worker cannot wedge.

Every malformed peft adapter tar, checkpoint and delta package we could think of is fed to a real
:class:`IntakeQueue` + :class:`MergeWorker` over a real store, interleaved with valid experts (peft
adapters written by peft itself, checkpoints, packages), with a restart in the middle. Every valid
expert must be merged, every bad one end ``rejected`` or ``failed`` with a reason, and the committed
track must equal OPCM over the valid experts alone (a continual merger never absorbs a rejected
expert), with only finite tensors.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file
from service_helpers import base_weights, finetuned, make_store

from fedmerge.aggregators.continual import create_continual
from fedmerge.codec import CodecConfig, PackageMeta, encode_package
from fedmerge.service.client import pack_peft
from fedmerge.service.intake import IntakeQueue, Submission
from fedmerge.service.worker import MergeWorker, expert_task_vector
from fedmerge.store import ModelStore

HUGE = 3e38  # finite in fp32, but products and sums of such values overflow


# ------------------------------------------------------------------------------------ experts


def _peft_dir(directory: Path, seed: int) -> Path:
    """A LoRA adapter of the tiny base model, written by peft's own ``save_pretrained``."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    base = base_weights()
    width = base["l1.weight"].shape[0]
    model = torch.nn.Sequential()
    model.add_module("l1", torch.nn.Linear(8, width))
    model.add_module("l2", torch.nn.Linear(width, 4))
    model.load_state_dict({k: v for k, v in base.items() if v.is_floating_point()})
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["l1", "l2"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    out = directory / f"peft-{seed}"
    wrapped.save_pretrained(str(out))
    return out


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _peft_files(directory: Path, seed: int) -> dict[str, bytes]:
    d = _peft_dir(directory, seed)
    return {n: (d / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


def _with_config(files: dict[str, bytes], edit: Callable[[dict[str, object]], object]) -> bytes:
    config = json.loads(files["adapter_config.json"])
    new = edit(config)
    return _tar({**files, "adapter_config.json": json.dumps(config if new is None else new).encode()})


def _with_weights(files: dict[str, bytes], edit: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    from safetensors.torch import load

    weights = dict(load(files["adapter_model.safetensors"]))
    edit(weights)
    return _tar({**files, "adapter_model.safetensors": save(weights)})


def _checkpoint(seed: int, edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> bytes:
    weights = finetuned(base_weights(), seed)
    if edit is not None:
        edit(weights)
    return save(weights)


BASE_HASH: dict[str, str] = {}  # the tiny base's content hash (the same in every fresh store)


def _package(tau: dict[str, torch.Tensor]) -> bytes:
    meta = PackageMeta(
        client_id="c", round=0, base_version_id="v000001", base_version_hash=BASE_HASH["v000001"]
    )
    return encode_package(tau, CodecConfig(), meta=meta).data


def _base_tau(seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: scale * torch.randn(v.shape, generator=g)
        for k, v in base_weights().items()
        if v.is_floating_point()
    }


@dataclass(frozen=True)
class Expert:
    name: str
    fmt: str
    data: bytes
    valid: bool


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(w: dict[str, torch.Tensor]) -> None:
        for k in [k for k in w if key in k]:
            del w[k]

    return edit


def _experts(tmp: Path) -> list[Expert]:
    """Valid experts interleaved with every malformed shape of adapter, checkpoint and package."""
    good = _peft_files(tmp, 1)
    from safetensors.torch import load

    some_a = sorted(k for k in load(good["adapter_model.safetensors"]) if "lora_A" in k)[0]

    def set_(key: str, value: object) -> Callable[[dict[str, object]], None]:
        return lambda c: c.__setitem__(key, value)

    def rank_mismatch(w: dict[str, torch.Tensor]) -> None:
        w[some_a] = torch.randn(3, w[some_a].shape[1])

    def int_factor(w: dict[str, torch.Tensor]) -> None:
        w[some_a] = torch.ones(w[some_a].shape, dtype=torch.int64)

    def three_d(w: dict[str, torch.Tensor]) -> None:
        w[some_a] = w[some_a][None]

    def huge_factors(w: dict[str, torch.Tensor]) -> None:
        for k in w:
            w[k] = torch.full(w[k].shape, HUGE)

    def nan_ckpt(w: dict[str, torch.Tensor]) -> None:
        w["l1.weight"][0, 0] = float("nan")

    def huge_ckpt(w: dict[str, torch.Tensor]) -> None:
        for k, v in w.items():
            if v.is_floating_point():
                w[k] = torch.full(v.shape, HUGE)

    def int_ckpt(w: dict[str, torch.Tensor]) -> None:
        w["l1.weight"] = w["l1.weight"].to(torch.int64)

    def wrong_shape(w: dict[str, torch.Tensor]) -> None:
        w["l1.weight"] = w["l1.weight"].t().contiguous()

    tar = pack_peft(_peft_dir(tmp, 2))
    bad: list[tuple[str, str, bytes]] = [
        ("peft-config-empty-object", "peft_tar", _tar({**good, "adapter_config.json": b"{}"})),
        ("peft-config-json-list", "peft_tar", _with_config(good, lambda c: [c])),
        ("peft-config-not-json", "peft_tar", _tar({**good, "adapter_config.json": b"\xff not json"})),
        ("peft-lora-alpha-object", "peft_tar", _with_config(good, set_("lora_alpha", {}))),
        ("peft-lora-alpha-string", "peft_tar", _with_config(good, set_("lora_alpha", "4"))),
        ("peft-r-zero", "peft_tar", _with_config(good, set_("r", 0))),
        ("peft-r-list", "peft_tar", _with_config(good, set_("r", [2]))),
        ("peft-target-modules-int", "peft_tar", _with_config(good, set_("target_modules", 7))),
        ("peft-fan-in-fan-out", "peft_tar", _with_config(good, set_("fan_in_fan_out", True))),
        ("peft-not-lora", "peft_tar", _with_config(good, set_("peft_type", "IA3"))),
        ("peft-weights-not-safetensors", "peft_tar", _tar({**good, "adapter_model.safetensors": b"x" * 64})),
        ("peft-weights-empty-header", "peft_tar", _tar({**good, "adapter_model.safetensors": save({})})),
        ("peft-only-lora-b", "peft_tar", _with_weights(good, _drop("lora_A"))),
        ("peft-only-lora-a", "peft_tar", _with_weights(good, _drop("lora_B"))),
        ("peft-rank-mismatch", "peft_tar", _with_weights(good, rank_mismatch)),
        ("peft-3d-factor", "peft_tar", _with_weights(good, three_d)),
        ("peft-huge-factors", "peft_tar", _with_weights(good, huge_factors)),
        ("peft-no-weights", "peft_tar", _tar({"adapter_config.json": good["adapter_config.json"]})),
        (
            "peft-no-config",
            "peft_tar",
            _tar({"adapter_model.safetensors": good["adapter_model.safetensors"]}),
        ),
        ("peft-truncated-tar", "peft_tar", tar[: tar.index(b"base_model.model") + 40]),
        ("peft-gzip-not-tar", "peft_tar", b"\x1f\x8b\x08\x00" + b"\x00" * 60),
        ("peft-empty-tar", "peft_tar", _tar({})),
        ("ckpt-garbage", "checkpoint", b"\x00" * 64),
        ("ckpt-empty-safetensors", "checkpoint", save({})),
        ("ckpt-huge-header-length", "checkpoint", (1 << 62).to_bytes(8, "little") + b"{}"),
        ("ckpt-nan", "checkpoint", _checkpoint(11, nan_ckpt)),
        ("ckpt-int-dtype", "checkpoint", _checkpoint(12, int_ckpt)),
        ("ckpt-wrong-shape", "checkpoint", _checkpoint(13, wrong_shape)),
        ("ckpt-missing-tensor", "checkpoint", _checkpoint(14, _drop("l2.bias"))),
        ("ckpt-all-3e38", "checkpoint", _checkpoint(15, huge_ckpt)),
        ("pkg-garbage", "delta_package", b"\x08\x01" + b"\xff" * 40),
        (
            "pkg-all-3e38",
            "delta_package",
            _package({k: torch.full(v.shape, HUGE) for k, v in _base_tau(0).items()}),
        ),
    ]
    valid: list[Expert] = [
        Expert("valid-peft-1", "peft_tar", _tar(good), True),
        Expert("valid-ckpt-1", "checkpoint", _checkpoint(1), True),
        Expert("valid-pkg-1", "delta_package", _package(_base_tau(1)), True),
        Expert("valid-peft-2", "peft_tar", tar, True),
        Expert("valid-ckpt-2", "checkpoint", _checkpoint(2), True),
        Expert("valid-pkg-2", "delta_package", _package(_base_tau(2)), True),
    ]
    out: list[Expert] = []
    for i, (name, fmt, data) in enumerate(bad):  # a valid expert after every sixth bad one
        out.append(Expert(name, fmt, data, False))
        if i % 6 == 5 and valid:
            out.append(valid.pop(0))
    out.extend(valid)
    return out


# ------------------------------------------------------------------------------------ helpers


def _submit(q: IntakeQueue, e: Expert) -> Submission:
    sub, dup = q.receive(
        client_id="client-00",
        fmt=e.fmt,
        base_version="",
        label=e.name,
        total_size=len(e.data),
        chunks=[e.data],
    )
    assert not dup, e.name
    return sub


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    store = make_store(tmp_path)
    with ModelStore.open(store) as s:
        BASE_HASH["v000001"] = s.get("v000001").content_hash
    intake = tmp_path / "intake"
    intake.mkdir()
    yield store, intake


def _all_finite(store: ModelStore) -> None:
    for v in store.list():
        if v.method != "opcm":
            continue
        for name, t in store.load_delta(v).items():
            assert bool(torch.isfinite(t).all()), f"{v.id} {name} is not finite"
        state = store.load_state(v)
        assert state is not None
        for name, t in state.items():
            assert not t.is_floating_point() or bool(torch.isfinite(t).all()), f"{v.id} state {name}"


# ------------------------------------------------------------------------------------ tests


def test_every_malformed_expert_is_set_aside_and_every_valid_one_merged_across_a_restart(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    store_path, intake = setup
    experts = _experts(tmp_path)
    half = len(experts) // 2
    q = IntakeQueue(intake)
    subs = {e.name: _submit(q, e) for e in experts}
    with ModelStore.open(store_path) as store:
        w = MergeWorker(store, q, method="opcm", params={})
        w.recover()
        # merge about half, then "restart": a fresh queue and worker over the same directories
        while sum(q.get(s.id).state != "queued" for s in subs.values()) < half:
            w.step()
    q.close()

    q = IntakeQueue(intake)
    with ModelStore.open(store_path) as store:
        w = MergeWorker(store, q, method="opcm", params={})
        w.recover()
        w.drain()
        assert q.queued(10) == []
        final = {e.name: q.get(subs[e.name].id) for e in experts}
        for e in experts:
            sub = final[e.name]
            if e.valid:
                assert sub.state == "merged", (e.name, sub.state, sub.reason)
            else:
                assert sub.state in ("rejected", "failed"), (e.name, sub.state)
                assert sub.reason and len(sub.reason) > 20, (e.name, sub.reason)
        for name in ("ckpt-all-3e38", "pkg-all-3e38", "peft-huge-factors"):
            assert final[name].state == "rejected", (name, final[name].reason)

        # the track is OPCM over the valid experts alone, in arrival order: nothing rejected absorbed
        valid = [e for e in experts if e.valid]
        head = store.get("continual")
        assert head.metadata["num_merged"] == len(valid) == w.merger.num_merged
        weights = {k: v for k, v in store.load_delta(w.base).items()}
        ref = create_continual("opcm")
        for e in valid:
            ref.add_expert(
                expert_task_vector(final[e.name], q.spool_path(final[e.name]), w.base, weights, 1 << 30)
            )
        torch.testing.assert_close(store.load_delta(head), ref.merged())
        _all_finite(store)
    q.close()


def test_a_restart_with_failed_and_rejected_submissions_in_the_queue(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    """Final states survive a restart; the restarted worker neither retries nor trips over them."""
    store_path, intake = setup
    q = IntakeQueue(intake)
    good = _peft_files(tmp_path, 3)
    bad = _submit(q, Expert("bad", "peft_tar", _tar({**good, "adapter_config.json": b"[1, 2]"}), False))
    worse = _submit(q, Expert("worse", "checkpoint", b"\x07" * 40, False))
    with ModelStore.open(store_path) as store:
        MergeWorker(store, q, method="opcm", params={}).drain()
    states = {s.id: (q.get(s.id).state, q.get(s.id).reason) for s in (bad, worse)}
    assert all(state in ("rejected", "failed") and reason for state, reason in states.values())
    q.close()

    q = IntakeQueue(intake)
    ok = _submit(q, Expert("ok", "checkpoint", _checkpoint(5), True))
    with ModelStore.open(store_path) as store:
        w = MergeWorker(store, q, method="opcm", params={})
        w.recover()
        w.drain()
        assert q.get(ok.id).state == "merged"
        assert {s.id: (q.get(s.id).state, q.get(s.id).reason) for s in (bad, worse)} == states
        assert store.get("continual").metadata["submissions"] == [ok.id]
    q.close()


def test_an_expert_that_keeps_killing_the_process_is_set_aside_alone(setup: tuple[Path, Path]) -> None:
    """Each begun merge is counted durably: after ``max_attempts`` unfinished ones (the process died
    while merging it) the expert is failed without another try, and its batch neighbours are merged."""
    store_path, intake = setup
    q = IntakeQueue(intake)
    poison = _submit(q, Expert("poison", "checkpoint", _checkpoint(21), True))
    other = _submit(q, Expert("other", "checkpoint", _checkpoint(22), True))
    for _ in range(3):  # three runs that began merging it and died (as an OOM kill would)
        q.begin_attempt(poison.id)
    with ModelStore.open(store_path) as store:
        w = MergeWorker(store, q, method="opcm", params={}, batch_size=4, max_attempts=3)
        w.recover()
        w.drain()
        failed = q.get(poison.id)
        assert failed.state == "failed" and "stopped 3 times while merging" in (failed.reason or "")
        assert q.get(other.id).state == "merged"
        assert store.get("continual").metadata["submissions"] == [other.id]
    q.close()


def test_a_batch_keeps_its_valid_experts_when_one_overflows(setup: tuple[Path, Path]) -> None:
    store_path, intake = setup
    q = IntakeQueue(intake)
    a = _submit(q, Expert("a", "delta_package", _package(_base_tau(31)), True))
    huge = _submit(
        q,
        Expert(
            "huge",
            "delta_package",
            _package({k: torch.full(v.shape, HUGE) for k, v in _base_tau(0).items()}),
            False,
        ),
    )
    b = _submit(q, Expert("b", "delta_package", _package(_base_tau(32)), True))
    with ModelStore.open(store_path) as store:
        w = MergeWorker(store, q, method="opcm", params={}, batch_size=8)
        w.recover()
        versions = w.drain()
        assert len(versions) == 1 and versions[0].metadata["submissions"] == [a.id, b.id]
        assert q.get(huge.id).state == "rejected"
        ref = create_continual("opcm")  # OPCM over a and b alone (as the codec decoded them)
        weights = store.load_delta(w.base)
        for sub in (a, b):
            ref.add_expert(expert_task_vector(sub, q.spool_path(sub), w.base, weights, 1 << 30))
        torch.testing.assert_close(store.load_delta(versions[0]), ref.merged())
        _all_finite(store)
    q.close()


def test_the_run_loop_is_not_wedged_by_a_poison_expert(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """``run()`` in its own thread, as the server runs it: a bad expert first, then a valid one."""
    store_path, intake = setup
    q = IntakeQueue(intake)
    good = _peft_files(tmp_path, 4)
    bad = _submit(
        q, Expert("bad", "peft_tar", _with_config(good, lambda c: c.__setitem__("lora_alpha", {})), False)
    )
    ok = _submit(q, Expert("ok", "peft_tar", _tar(good), True))
    stop = threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        with ModelStore.open(store_path) as store:
            w = MergeWorker(store, q, method="opcm", params={})
            w.recover()
            try:
                w.run(stop, idle_wait=0.05)
            finally:
                if w.error is not None:
                    errors.append(w.error)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if q.get(ok.id).state != "queued":
                break
            stop.wait(0.1)
    finally:
        stop.set()
        q.wake()
        thread.join(60)
    assert q.get(bad.id).state in ("rejected", "failed") and q.get(bad.id).reason
    assert q.get(ok.id).state == "merged", q.get(ok.id).reason
    assert errors == []  # the bad expert was not a store failure: no retry loop
    q.close()


def test_a_checkpoint_file_with_its_own_header_saved_by_safetensors(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    """A checkpoint written by ``save_file`` with metadata is a plain valid expert (control case)."""
    store_path, intake = setup
    path = tmp_path / "ok.safetensors"
    save_file(finetuned(base_weights(), 41), str(path), metadata={"format": "pt"})
    q = IntakeQueue(intake)
    sub = _submit(q, Expert("ok", "checkpoint", path.read_bytes(), True))
    with ModelStore.open(store_path) as store:
        MergeWorker(store, q, method="opcm", params={}).drain()
    assert q.get(sub.id).state == "merged"
    q.close()


def test_an_unexpected_error_is_a_dead_letter_and_the_next_expert_merges(setup: tuple[Path, Path]) -> None:
    """An error that is no FedMergeError (here: the spool file vanished, FileNotFoundError) marks the
    expert FAILED with the exception named; the merger is untouched and the next expert merges."""
    store_path, intake = setup
    q = IntakeQueue(intake)
    lost = _submit(q, Expert("lost", "delta_package", _package(_base_tau(51)), True))
    ok = _submit(q, Expert("ok", "checkpoint", _checkpoint(52), True))
    q.spool_path(lost).unlink()
    with ModelStore.open(store_path) as store:
        w = MergeWorker(store, q, method="opcm", params={})
        w.recover()
        w.drain()
        failed = q.get(lost.id)
        assert failed.state == "failed", failed
        assert (
            failed.reason and "FileNotFoundError" in failed.reason and "set aside as failed" in failed.reason
        )
        assert q.get(ok.id).state == "merged" and w.merger.num_merged == 1
    q.close()
