"""End to end over real gRPC on localhost: submit, merge, idempotency, queries, downloads, watch."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from service_helpers import TOKEN, base_weights, finetuned, target, write_expert

from fedmerge.aggregators.continual import create_continual
from fedmerge.delta.state_dict import task_vector
from fedmerge.service.client import (
    ClientOptions,
    download_version,
    get_submission,
    list_versions,
    submit_expert,
    wait_merged,
    watch_versions,
)
from fedmerge.service.server import IntakeServer
from fedmerge.store import ModelStore
from fedmerge.v1 import intake_pb2


def floating_tv(seed: int) -> dict[str, torch.Tensor]:
    base = base_weights()
    ft = finetuned(base, seed)
    return {k: (ft[k].float() - base[k].float()) for k in base if base[k].is_floating_point()}


def test_experts_merge_in_order_into_one_version_each(server: IntakeServer, tmp_path: Path) -> None:
    opts = ClientOptions(target(server), token=TOKEN)
    ids = []
    for seed in range(3):
        reply = submit_expert(opts, write_expert(tmp_path, base_weights(), seed))
        assert (
            reply.state == intake_pb2.SUBMISSION_STATE_QUEUED
            or reply.state == intake_pb2.SUBMISSION_STATE_MERGED
        )
        ids.append(reply.submission_id)
    subs = [wait_merged(opts, sid, timeout=60) for sid in ids]
    assert [s.state for s in subs] == [intake_pb2.SUBMISSION_STATE_MERGED] * 3
    assert [s.sequence for s in subs] == [1, 2, 3]
    assert len({s.version for s in subs}) == 3  # one version per expert
    assert all(s.client_id == "client-00" for s in subs)

    # the committed merged task vector equals the merger run directly on the same experts, bit for bit
    reference = create_continual("opcm")
    for seed in range(3):
        reference.add_expert(floating_tv(seed))
    with ModelStore.open(server.config.store) as store:
        head = store.get("continual")
        assert head.id == subs[-1].version
        delta = store.load_delta(head)
        assert head.parents[0] == store.root_of(head).id  # delta relative to the base
        assert head.parents[1] == subs[1].version  # lineage to the previous continual version
        merged = reference.merged()
        assert set(delta) == set(merged)
        for k in merged:
            assert torch.equal(delta[k], merged[k]), k
        assert [c.submission_hash for c in head.contributors] == [subs[-1].sha256]


def test_resubmission_returns_same_id_and_merges_once(server: IntakeServer, tmp_path: Path) -> None:
    opts = ClientOptions(target(server), token=TOKEN)
    path = write_expert(tmp_path, base_weights(), 5)
    first = submit_expert(opts, path)
    wait_merged(opts, first.submission_id, timeout=60)
    again = submit_expert(opts, path)
    assert again.submission_id == first.submission_id and again.duplicate
    assert not first.duplicate
    versions = [v for v in list_versions(opts) if v.method == "opcm"]
    assert len(versions) == 1 and versions[0].submissions == [first.submission_id]


def test_rejected_expert_reports_the_offending_tensor(server: IntakeServer, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    opts = ClientOptions(target(server), token=TOKEN)
    bad = finetuned(base_weights(), 1)
    bad["l1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    sub = wait_merged(opts, submit_expert(opts, path).submission_id, timeout=60)
    assert sub.state == intake_pb2.SUBMISSION_STATE_REJECTED
    assert "l1.weight" in sub.reason and "(3, 3)" in sub.reason
    # a good expert after a rejected one is still merged
    good = wait_merged(
        opts, submit_expert(opts, write_expert(tmp_path, base_weights(), 2)).submission_id, timeout=60
    )
    assert good.state == intake_pb2.SUBMISSION_STATE_MERGED


def test_get_version_streams_delta_and_full_weights(server: IntakeServer, tmp_path: Path) -> None:
    opts = ClientOptions(target(server), token=TOKEN)
    sub = wait_merged(
        opts, submit_expert(opts, write_expert(tmp_path, base_weights(), 0)).submission_id, timeout=60
    )
    info = download_version(opts, sub.version, tmp_path / "delta.safetensors")
    full_info = download_version(opts, "continual", tmp_path / "full.safetensors", full_weights=True)
    assert info.id == full_info.id == sub.version and info.submissions == [sub.submission_id]
    with ModelStore.open(server.config.store) as store:
        expected_delta = store.load_delta(sub.version)
        expected_full = store.materialize(sub.version)
    got_delta = load_file(str(tmp_path / "delta.safetensors"))
    got_full = load_file(str(tmp_path / "full.safetensors"))
    assert set(got_delta) == set(expected_delta) and all(
        torch.equal(got_delta[k], expected_delta[k]) for k in got_delta
    )
    assert set(got_full) == set(expected_full) and all(
        torch.equal(got_full[k], expected_full[k]) for k in got_full
    )
    assert torch.equal(got_full["steps"], torch.tensor([7]))  # integer buffers come from the base


def test_get_unknown_ids_is_not_found(server: IntakeServer) -> None:
    from fedmerge.service.client import ServiceCallError

    opts = ClientOptions(target(server), token=TOKEN)
    with pytest.raises(ServiceCallError, match="NOT_FOUND") as err:
        get_submission(opts, "s-doesnotexist")
    assert not err.value.retryable
    with pytest.raises(ServiceCallError, match="NOT_FOUND"):
        download_version(opts, "v999999", Path(server.config.store).parent / "x.safetensors")


def test_watch_versions_streams_new_versions(server: IntakeServer, tmp_path: Path) -> None:
    opts = ClientOptions(target(server), token=TOKEN)
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        for info in watch_versions(opts):
            seen.append(info.id)
            if len(seen) == 2:
                break
        done.set()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    subs = [submit_expert(opts, write_expert(tmp_path, base_weights(), s)).submission_id for s in (11, 12)]
    versions = [wait_merged(opts, sid, timeout=60).version for sid in subs]
    assert done.wait(30)
    assert seen == versions


def test_task_vector_matches_store_materialisation(server: IntakeServer, tmp_path: Path) -> None:
    opts = ClientOptions(target(server), token=TOKEN)
    sub = wait_merged(
        opts, submit_expert(opts, write_expert(tmp_path, base_weights(), 3)).submission_id, timeout=60
    )
    with ModelStore.open(server.config.store) as store:
        full = store.materialize(sub.version)
        root = store.materialize(store.root_of(store.get(sub.version)).id)
    tv = task_vector(root, full)
    # first expert: OPCM's merged task vector is the expert itself
    expected = floating_tv(3)
    for k in expected:
        torch.testing.assert_close(tv[k].float(), expected[k], rtol=0, atol=1e-6)
