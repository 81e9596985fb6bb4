"""Committing a task vector tensor by tensor (``commit_stream``) and reading one materialised tensor."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from store_test_helpers import commit_delta, contributor, tiny_delta, tiny_model

from fedmerge.errors import ConfigError, IncompatibleDeltasError
from fedmerge.store import ModelStore
from fedmerge.store.s3 import S3BlobBackend

BOTH_CATALOGS = True  # every test using ``store`` runs on SQLite and on PostgreSQL
BOTH_BACKENDS = True  # and on a local directory and on S3 (a real SeaweedFS)


def stream(store: ModelStore, pairs: Iterator[tuple[str, torch.Tensor]], parent: str):  # type: ignore[no-untyped-def]
    return store.commit_stream(
        pairs, parents=[parent], method="fedavg", params={"p": 1}, contributors=[contributor(0)],
        round=1, metrics={"m": 1.0}, privacy=None,
    )  # fmt: skip


def test_a_streamed_commit_stores_what_commit_stores(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    delta = tiny_delta(base, 1)
    whole = commit_delta(store, delta, root.id, 1, aliases=())
    streamed = stream(store, iter(sorted(delta.items())), root.id)
    assert streamed.tensors == whole.tensors  # the same blobs, names, dtypes and shapes
    assert store.get("latest").id == streamed.id
    got = store.materialize(streamed.id)
    assert all(torch.equal(got[n], store.materialize(whole.id)[n]) for n in base)
    for name in base:
        assert torch.equal(store.materialized_tensor(streamed.id, name), got[name]), name


def test_a_streamed_commit_keeps_state_as_commit_does(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    delta = tiny_delta(base, 3)
    state = {
        "opt.m": torch.arange(6.0).reshape(2, 3),
        "residual.w": torch.full((4,), -0.5, dtype=torch.bfloat16),
    }
    whole = commit_delta(store, delta, root.id, 1, aliases=(), state=state)
    streamed = store.commit_stream(
        iter(sorted(delta.items())), parents=[root.id], method="fedavg", params={"server_lr": 1.0},
        contributors=[contributor(0), contributor(1)], round=1, metrics={"loss": 0.25}, privacy=None,
        state=state,
    )  # fmt: skip
    assert streamed.state == whole.state and streamed.tensors == whole.tensors
    got = store.load_state(streamed.id)
    assert got is not None and sorted(got) == sorted(state)
    assert all(torch.equal(got[n], state[n]) and got[n].dtype == state[n].dtype for n in state)
    assert store.verify().ok


def test_a_mapping_given_to_commit_stream_is_committed_as_commit_commits_it(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    delta = tiny_delta(base, 4)
    whole = commit_delta(store, delta, root.id, 1, aliases=())
    mapped = store.commit_stream(
        delta, parents=[root.id], method="fedavg", params={"server_lr": 1.0},
        contributors=[contributor(0), contributor(1)], round=1, metrics={"loss": 0.25}, privacy=None,
    )  # fmt: skip
    assert mapped.tensors == whole.tensors and mapped.content_hash == whole.content_hash


def test_a_failing_stream_leaves_the_store_as_it_was(store: ModelStore) -> None:
    if isinstance(store.blobs, S3BlobBackend):
        pytest.skip("on object storage a failed commit's completed uploads stay, unreferenced, until gc")
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    delta = tiny_delta(base, 2)
    blobs_before = set(store.blobs.digests())

    def dies() -> Iterator[tuple[str, torch.Tensor]]:
        items = sorted(delta.items())
        yield items[0]
        raise RuntimeError("the merge failed part-way")

    with pytest.raises(RuntimeError, match="part-way"):
        stream(store, dies(), root.id)
    assert [v.id for v in store.list()] == [root.id]
    assert store.get("latest").id == root.id
    assert set(store.blobs.digests()) == blobs_before
    assert store.blobs.leftover_tmp() == []


@pytest.mark.parametrize("fault", ["missing", "extra", "shape", "integer", "twice"])
def test_a_stream_that_does_not_match_the_base_is_refused(store: ModelStore, fault: str) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    items = sorted(tiny_delta(base, 3).items())
    name, t = items[0]
    if fault == "missing":
        items = items[1:]
    elif fault == "extra":
        items.append(("not.in.base", torch.zeros(3)))
    elif fault == "shape":
        items[0] = (name, torch.zeros(t.numel() + 1))
    elif fault == "integer":
        items[0] = (name, torch.zeros(t.shape, dtype=torch.int32))
    else:
        items.append(items[0])
    expected = ConfigError if fault == "twice" else IncompatibleDeltasError
    with pytest.raises(expected):
        stream(store, iter(items), root.id)
    assert [v.id for v in store.list()] == [root.id]
    assert store.blobs.leftover_tmp() == []


def test_materialized_tensor_of_an_unknown_name_is_a_key_error(store: ModelStore) -> None:
    root = store.commit_base(tiny_model(), name="tiny")
    with pytest.raises(KeyError):
        store.materialized_tensor(root.id, "nope")


def test_views_read_each_tensor_on_lookup_and_equal_the_whole_reads(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    delta = tiny_delta(base, 4)
    v = commit_delta(store, delta, root.id, 1)
    weights, stored = store.weights_view(v.id), store.delta_view(v.id)
    full = store.materialize(v.id)
    assert list(weights) == sorted(full) and len(weights) == len(full)
    assert weights.shapes == {n: tuple(t.shape) for n, t in sorted(full.items())}
    assert all(torch.equal(weights[n], full[n]) for n in full)
    assert dict(stored.items()).keys() == delta.keys()
    assert all(torch.equal(stored[n], delta[n]) for n in delta)
    with pytest.raises(KeyError):
        stored["nope"]


def test_a_stream_is_produced_while_its_previous_tensor_is_staged_and_never_more(store: ModelStore) -> None:
    """The next tensor of a stream (a tensor-major merge) is produced while the previous one is still
    being staged — the two overlap — and no earlier tensor is held: STREAM_WORKERS tensors at most."""
    import gc
    import weakref

    from fedmerge.store.model_store import STREAM_WORKERS

    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    delta = tiny_delta(base, 1)
    alive_when_producing: list[int] = []
    refs: list[weakref.ref[torch.Tensor]] = []

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for name in sorted(delta):
            gc.collect()
            alive_when_producing.append(sum(r() is not None for r in refs))
            t = delta[name].clone()
            refs.append(weakref.ref(t))
            yield name, t
            del t

    version = stream(store, produce(), root.id)
    assert len(alive_when_producing) == len(delta) >= 3
    assert alive_when_producing[0] == 0
    assert all(n == STREAM_WORKERS - 1 for n in alive_when_producing[1:]), alive_when_producing
    assert version.tensors == commit_delta(store, delta, root.id, 1, aliases=()).tensors  # the same blobs
