"""Committing, reading, materialising, listing, lineage, diff and aliases on a real on-disk store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from store_test_helpers import commit_delta, contributor, tiny_delta, tiny_model

from fedmerge.delta.state_dict import accumulation_dtype, apply
from fedmerge.errors import ConfigError, IncompatibleDeltasError, StoreIntegrityError
from fedmerge.store import InvalidAliasError, ModelStore, UnknownVersionError

BOTH_CATALOGS = True  # every test using ``store`` runs on SQLite and on PostgreSQL


def test_commit_base_then_deltas_materialises_to_base_plus_chain(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny", metadata={"arch": "mlp"})
    d1, d2 = tiny_delta(base, 1), tiny_delta(base, 2)
    v1 = commit_delta(store, d1, root.id, 1)
    v2 = commit_delta(store, d2, v1.id, 2)
    assert [root.id, v1.id, v2.id] == ["v000001", "v000002", "v000003"]
    assert (v2.base_version, v2.base_hash) == (root.id, root.content_hash)
    got = store.materialize(v2.id)
    assert got.keys() == base.keys()
    for name, t in base.items():  # θ_root + τ1 + τ2 summed in fp32 (fp64 stays), rounded once
        acc = t.to(accumulation_dtype(t.dtype))
        want = (acc + d1[name].to(acc.dtype) + d2[name].to(acc.dtype)).to(t.dtype) if name in d1 else t
        assert got[name].dtype == t.dtype
        assert torch.equal(got[name], want), name
    one_step = apply(base, d1)  # agrees with the shared task-arithmetic helper
    assert all(torch.equal(store.materialize(v1.id)[n], one_step[n]) for n in base)
    assert torch.equal(got["norm.num_batches_tracked"], base["norm.num_batches_tracked"])
    assert [n for n, _ in store.iter_materialized(v1.id)] == sorted(base)


def test_materialise_sums_in_fp32_not_in_the_root_dtype(store: ModelStore) -> None:
    base = {"w": torch.zeros(4, dtype=torch.float16)}
    root = store.commit_base(base, name="half")
    v = root
    for i in range(10):  # 10 x 1e-4 underflows fp16 step by step but not in fp32
        v = commit_delta(store, {"w": torch.full((4,), 1e-4)}, v.id, i)
    assert torch.allclose(store.materialize(v.id)["w"].float(), torch.full((4,), 1e-3), rtol=1e-3)


def test_load_delta_and_state_round_trip_bit_exact(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    delta = tiny_delta(base, 3)
    state = {"sign_sum": torch.arange(6, dtype=torch.int32), "energy": torch.rand(3, 3, dtype=torch.float64)}
    v = commit_delta(store, delta, root.id, 1, state=state)
    reopened = ModelStore.open(store.root, catalog=store.catalog.url)
    got = reopened.load_delta(v.id)
    assert all(torch.equal(got[k], delta[k]) for k in delta)
    got_state = reopened.load_state(v.id)
    assert got_state is not None and all(torch.equal(got_state[k], state[k]) for k in state)
    assert reopened.load_state(root.id) is None
    assert reopened.get(v.id) == v  # the manifest read back equals what commit returned
    reopened.close()


def test_manifest_records_provenance(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    v = commit_delta(
        store,
        tiny_delta(base, 1),
        root.id,
        4,
        method="ties",
        params={"density": 0.2, "lambda": 1.0},
        contributors=[contributor(0), contributor(1, accepted=False)],
        metrics={"acc": 0.9},
        privacy={"epsilon": 2.0, "delta": 1e-5},
    )
    assert (v.method, v.params, v.round, v.privacy) == ("ties", {"density": 0.2, "lambda": 1.0}, 4, v.privacy)
    assert v.privacy == {"epsilon": 2.0, "delta": 1e-5}
    assert [c.accepted for c in v.contributors] == [True, False]
    assert v.contributors[1].reason == "norm too large"
    assert v.parents == (root.id,) and v.parent_hashes == (root.content_hash,)
    assert v.sequence == 2 and v.format_version == 1
    assert set(v.tensors) == {n for n, t in base.items() if t.is_floating_point()}


def test_identical_content_gets_identical_hash_and_shares_blobs(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    delta = tiny_delta(base, 1)
    a = commit_delta(store, delta, root.id, 1)
    b = commit_delta(store, delta, root.id, 1)
    assert a.id != b.id and a.content_hash == b.content_hash
    assert a.blobs == b.blobs
    c = commit_delta(store, delta, root.id, 2)
    assert c.content_hash != a.content_hash


@pytest.mark.parametrize(
    ("mutate", "error", "needle"),
    [
        (lambda d: d.pop("embed.weight"), IncompatibleDeltasError, "embed.weight"),
        (lambda d: d.update({"extra": torch.zeros(2)}), IncompatibleDeltasError, "extra"),
        (lambda d: d.update({"head.weight": torch.zeros(3, 6)}), IncompatibleDeltasError, "head.weight"),
        (
            lambda d: d.update({"head.weight": torch.zeros(2, 6, dtype=torch.int32)}),
            IncompatibleDeltasError,
            "int",
        ),
        (lambda d: d.update({"head.weight": [1.0]}), ConfigError, "head.weight"),
    ],
)
def test_bad_deltas_are_refused_before_anything_is_written(store: ModelStore, mutate, error, needle) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    delta = tiny_delta(base, 1)
    mutate(delta)
    blobs_before = set(store.blobs.digests())
    with pytest.raises(error, match=needle):
        commit_delta(store, delta, root.id, 1)
    assert [v.id for v in store.list()] == [root.id]
    assert set(store.blobs.digests()) == blobs_before


def test_bad_arguments_name_the_offending_value(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    delta = tiny_delta(base, 1)
    with pytest.raises(UnknownVersionError, match="v000009"):
        commit_delta(store, delta, "v000009", 1)
    with pytest.raises(UnknownVersionError, match="nope"):
        commit_delta(store, delta, "nope", 1)
    with pytest.raises(ConfigError, match=r"metrics\['loss'\] is nan"):
        commit_delta(store, delta, root.id, 1, metrics={"loss": float("nan")})
    with pytest.raises(ConfigError, match="params\\['fn'\\] is a builtin_function_or_method"):
        commit_delta(store, delta, root.id, 1, params={"fn": len})
    with pytest.raises(ConfigError, match="round is -1"):
        commit_delta(store, delta, root.id, -1)
    with pytest.raises(InvalidAliasError, match="v000002"):
        commit_delta(store, delta, root.id, 1, aliases=["v000002"])
    with pytest.raises(ConfigError, match="kind 'full'"):
        commit_delta(store, delta, root.id, 1, kind="full")
    with pytest.raises(ConfigError, match="at least one parent"):
        store.commit(
            delta, parents=[], method="m", params={}, contributors=[], round=1, metrics={}, privacy=None
        )


def test_parents_from_different_bases_are_refused(store: ModelStore) -> None:
    a = store.commit_base(tiny_model(0), name="a")
    b = store.commit_base(tiny_model(1), name="b")
    with pytest.raises(IncompatibleDeltasError, match="different base"):
        store.commit(
            tiny_delta(tiny_model(), 1),
            parents=[a.id, b.id],
            method="m",
            params={},
            contributors=[],
            round=1,
            metrics={},
            privacy=None,
        )


def test_list_and_query(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    v1 = commit_delta(store, tiny_delta(base, 1), root.id, 1, method="fedavg", contributors=[contributor(0)])
    v2 = commit_delta(store, tiny_delta(base, 2), v1.id, 2, method="ties", contributors=[contributor(1)])
    v3 = commit_delta(
        store, tiny_delta(base, 3), v2.id, 2, method="ties", contributors=[contributor(0, accepted=False)]
    )
    assert [v.id for v in store.list()] == [v3.id, v2.id, v1.id, root.id]
    assert [v.id for v in store.list(limit=2)] == [v3.id, v2.id]
    assert [v.id for v in store.query(round=2)] == [v3.id, v2.id]
    assert [v.id for v in store.query(method="fedavg")] == [v1.id]
    assert [v.id for v in store.query(contributor="client-0")] == [v1.id]  # v3 rejected client-0
    assert [v.id for v in store.query(alias="latest")] == [v3.id]
    assert [v.id for v in store.query(kind="full")] == [root.id]
    assert store.query(round=2, method="fedavg") == []


def test_lineage_follows_every_parent(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    a = commit_delta(store, tiny_delta(base, 1), root.id, 1)
    b = commit_delta(store, tiny_delta(base, 2), root.id, 1)
    merged = store.commit(
        tiny_delta(base, 3),
        parents=[a.id, b.id],
        method="ties",
        params={},
        contributors=[],
        round=2,
        metrics={},
        privacy=None,
    )
    lineage = store.lineage(merged.id)
    assert lineage.ancestors() == [merged.id, b.id, a.id, root.id]
    assert set(lineage.edges()) == {(merged.id, a.id), (merged.id, b.id), (a.id, root.id), (b.id, root.id)}
    assert lineage.roots() == [root.id]
    assert [v.id for v in store.chain(merged)] == [
        root.id,
        a.id,
        merged.id,
    ]  # delta is relative to parents[0]


def test_diff_reports_per_tensor_norms_of_the_change(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    d = tiny_delta(base, 1)
    v = commit_delta(store, d, root.id, 1)
    diff = store.diff(root.id, v.id)
    by_name = {t.name: t for t in diff.tensors}
    assert set(by_name) == set(base)
    assert by_name["norm.num_batches_tracked"].change_norm == 0.0
    expected = float(d["embed.weight"].double().norm())
    assert by_name["embed.weight"].change_norm == pytest.approx(expected, rel=1e-6)
    assert by_name["embed.weight"].norm_a == pytest.approx(float(base["embed.weight"].double().norm()))
    assert store.diff(v.id, v.id).total_change_norm == 0.0
    other = store.commit_base({"x": torch.zeros(2)}, name="other", aliases=[])
    with pytest.raises(IncompatibleDeltasError, match="different tensor names"):
        store.diff(v.id, other.id)


def test_aliases_and_rollback_move_pointers_and_delete_nothing(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    vs = [root]
    for i in range(3):
        vs.append(commit_delta(store, tiny_delta(base, i), vs[-1].id, i))
    assert store.get("latest").id == vs[-1].id
    assert store.set_alias("prod", vs[1].id) is None
    assert store.set_alias("prod", vs[2].id) == vs[1].id
    store.set_alias("prod", "latest")
    assert store.get("prod").id == vs[3].id
    assert store.rollback("prod") == vs[2].id
    assert store.rollback("prod") == vs[1].id
    with pytest.raises(ConfigError, match="no earlier target"):
        store.rollback("prod")
    assert store.rollback("prod", to=vs[3].id) == vs[3].id
    assert store.aliases_of(vs[3].id) == ["latest", "prod"]
    assert len(store.list()) == 4
    with pytest.raises(UnknownVersionError, match="staging"):
        store.rollback("staging")
    with pytest.raises(InvalidAliasError):
        store.set_alias("9lives", root.id)


def test_open_refuses_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(StoreIntegrityError, match="not a fedmerge store"):
        ModelStore.open(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
