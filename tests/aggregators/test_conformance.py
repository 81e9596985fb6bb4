"""Properties every registered aggregator must have (parametrised over the whole registry)."""

from __future__ import annotations

import random

import pytest
import torch

from fedmerge.aggregators import available, create, get, merge
from fedmerge.delta import SparseTensor
from fedmerge.errors import (
    AggregatorStateError,
    ConfigError,
    IncompatibleDeltasError,
    InvalidSubmission,
    UnknownAggregatorError,
)

ALL = available()
SHAPES = {"layer.weight": (12, 20), "layer.bias": (20,), "emb": (7, 3, 2)}


def random_deltas(n: int, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(n)]


AVERAGING = [n for n in ALL if get(n).averaging]
# Methods that merge a fixed number of models (slerp: two) declare ``exact_models``; every property
# below is checked on that many clients for them, and a further model must be refused.
EXACT = {n: int(get(n).exact_models) for n in ALL if getattr(get(n), "exact_models", None)}


def clients(name: str, n: int) -> int:
    """n, or the method's fixed number of models when it takes fewer."""
    return min(n, EXACT.get(name, n))


def run(name: str, deltas, weights, ids=None, **params):  # type: ignore[no-untyped-def]
    agg = create(name, **params)
    agg.begin({k: v.shape for k, v in deltas[0].items()})
    for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
        agg.add(d, w, client_id=i if ids is None else ids[i])
    return agg.finalize()


def assert_close(a, b, tol=1e-5):  # type: ignore[no-untyped-def]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol, msg=lambda m, k=k: f"{k}: {m}")


def test_registry_has_the_required_methods() -> None:
    assert {
        "fedavg",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "della",
        "magmax",
        "trimmed_mean",
        "median",
    } <= set(ALL)


@pytest.mark.parametrize("name", AVERAGING)
@pytest.mark.parametrize("n", [1, 4])
def test_identical_inputs_give_the_input_back(name: str, n: int) -> None:
    n = clients(name, n)
    (d,) = random_deltas(1, SHAPES, seed=3)
    out = run(name, [d] * n, [float(i + 1) for i in range(n)], **get(name).identity_params)
    assert_close(out, d)


@pytest.mark.parametrize("name", ALL)
def test_client_order_does_not_matter(name: str) -> None:
    n = clients(name, 6)
    ds = random_deltas(n, SHAPES, seed=4)
    ws = [1.0, 2.0, 0.5, 3.0, 1.0, 4.0][:n]
    ids = [f"client-{i}" for i in range(n)]
    order = list(range(n))
    if n == 2:
        order = [1, 0]
    random.Random(0).shuffle(order)
    a = run(name, ds, ws, ids)
    b = run(name, [ds[i] for i in order], [ws[i] for i in order], [ids[i] for i in order])
    assert_close(a, b)


@pytest.mark.parametrize("name", ALL)
def test_zero_deltas_give_zero(name: str) -> None:
    n = clients(name, 3)
    zeros = [{k: torch.zeros(s) for k, s in SHAPES.items()} for _ in range(n)]
    out = run(name, zeros, [1.0, 2.0, 3.0][:n])
    for k, v in out.items():
        assert v.shape == SHAPES[k]
        assert torch.count_nonzero(v) == 0, k


@pytest.mark.parametrize("name", ALL)
def test_all_zero_coordinates_stay_zero_and_finite(name: str) -> None:
    n = clients(name, 4)
    ds = random_deltas(n, {"w": (8, 8)}, seed=5)
    for d in ds:
        d["w"][:, 3] = 0.0  # an all-zero column across every client
    out = run(name, ds, [1.0, 1.0, 2.0, 2.0][:n])
    assert torch.isfinite(out["w"]).all()
    if getattr(get(name), "spectral", False):  # SVD-based (iso_c, tsv_m, ...): zero up to fp32 rounding
        assert out["w"][:, 3].abs().max() <= 1e-5 * out["w"].abs().max()
        assert out["w"].abs().max() > 0.1  # and not because everything vanished
    else:
        assert torch.count_nonzero(out["w"][:, 3]) == 0


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("group_size", [1, 3])
def test_grouping_does_not_change_the_result(name: str, group_size: int) -> None:
    n = clients(name, 7)
    ds = random_deltas(n, SHAPES, seed=6)
    ws = [float(i + 1) for i in range(n)]
    assert_close(run(name, ds, ws, group_size=group_size), run(name, ds, ws, group_size=8))


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("della", "della_linear")])
def test_sparse_inputs_equal_dense_inputs(name: str) -> None:
    n = clients(name, 4)
    ds = random_deltas(n, SHAPES, seed=7)
    for d in ds:  # make them genuinely sparse
        for k in d:
            d[k] = torch.where(d[k].abs() > 1.0, d[k], torch.zeros(()))
    sparse = [{k: SparseTensor.from_dense(v) for k, v in d.items()} for d in ds]
    params = {"density": 1.0} if name in ("dare_linear", "dare_ties") else {}
    ws = [1, 2, 3, 4][:n]
    assert_close(run(name, sparse, ws, **params), run(name, ds, ws, **params))


@pytest.mark.parametrize("name", ALL)
def test_bf16_and_fp16_inputs_accumulate_in_fp32(name: str) -> None:
    n = clients(name, 4)
    ds = random_deltas(n, SHAPES, seed=8)
    ws = [1, 2, 3, 4][:n]
    for dtype in (torch.bfloat16, torch.float16):
        low = [{k: v.to(dtype) for k, v in d.items()} for d in ds]
        ref = [{k: v.float() for k, v in d.items()} for d in low]  # the same values, in fp32
        out = run(name, low, ws)
        assert all(v.dtype == torch.float32 for v in out.values())
        assert_close(out, run(name, ref, ws))


@pytest.mark.parametrize("name", ALL)
def test_mismatched_shapes_and_names_raise_naming_the_key(name: str) -> None:
    ds = random_deltas(2, SHAPES, seed=9)
    agg = create(name)
    agg.begin(SHAPES)
    agg.add(ds[0])
    bad = dict(ds[1])
    bad["layer.bias"] = torch.zeros(21)
    with pytest.raises(IncompatibleDeltasError, match=r"layer\.bias") as err:
        agg.add(bad)
    assert err.value.key == "layer.bias"
    missing = {k: v for k, v in ds[1].items() if k != "emb"}
    with pytest.raises(IncompatibleDeltasError, match="missing tensor 'emb'"):
        agg.add(missing)
    extra = {**ds[1], "surprise": torch.zeros(2)}
    with pytest.raises(IncompatibleDeltasError, match="surprise"):
        agg.add(extra)
    # the rejected submissions changed nothing: the merge equals the merge of the first delta alone
    agg.add(ds[1])
    assert_close(agg.finalize(), run(name, ds, [1.0, 1.0]))


@pytest.mark.parametrize("name", ALL)
def test_state_machine_and_bad_weights(name: str) -> None:
    agg = create(name)
    with pytest.raises(AggregatorStateError, match="begin"):
        agg.add({"w": torch.zeros(2)})
    agg.begin({"w": (2,)})
    with pytest.raises(AggregatorStateError, match="before any add"):
        agg.finalize()
    for w in (float("nan"), -1.0, float("inf")):
        with pytest.raises(InvalidSubmission, match="weight"):
            agg.add({"w": torch.ones(2)}, w)
    with pytest.raises(InvalidSubmission, match="floating"):
        agg.add({"w": torch.ones(2, dtype=torch.int64)})
    agg.add({"w": torch.ones(2)}, 1.0)
    agg.finalize()
    with pytest.raises(AggregatorStateError, match="finalized"):
        agg.add({"w": torch.ones(2)})


@pytest.mark.parametrize("name", ALL)
def test_memory_is_bounded_by_the_group(name: str) -> None:
    agg = create(name, group_size=4)
    agg.begin({"w": (16,)})
    n = clients(name, 21)
    for i in range(n):
        agg.add({"w": torch.randn(16)}, 1.0, client_id=i)
        assert len(agg._pending) < 4  # never more than one group of dense deltas is held
    assert agg.num_clients == n
    if get(name).streaming:
        assert len(agg._acc["w"]) <= 5 and all(a.numel() == 16 for a in agg._acc["w"])


@pytest.mark.parametrize("name", sorted(EXACT))
def test_fixed_arity_methods_refuse_one_model_too_many(name: str) -> None:
    agg = create(name)
    agg.begin({"w": (3,)})
    for i in range(EXACT[name]):
        agg.add({"w": torch.randn(3)}, 1.0, client_id=i)
    with pytest.raises(AggregatorStateError, match="exactly"):
        agg.add({"w": torch.randn(3)}, 1.0, client_id=99)
    assert agg.num_clients == EXACT[name]
    agg.finalize()


def test_new_methods_are_registered() -> None:
    assert {
        "breadcrumbs",
        "breadcrumbs_ties",
        "della_linear",
        "slerp",
        "multislerp",
        "model_stock",
        "iso_c",
        "iso_cts",
        "tsv_m",
    } <= set(ALL)
    assert EXACT == {"slerp": 2, "nuslerp": 2, "arcee_fusion": 2, "nearswap": 2}


def test_unknown_names_and_parameters_are_reported() -> None:
    with pytest.raises(UnknownAggregatorError, match=r"available: .*ties"):
        create("tiez")
    with pytest.raises(ConfigError, match="does not take \\['dnesity'\\]"):
        create("ties", dnesity=0.3)
    with pytest.raises(ConfigError, match="density"):
        create("ties", density=1.5)
    with pytest.raises(ConfigError, match="sign_election"):
        create("ties", sign_election="majority")
    with pytest.raises(ConfigError, match="density ± epsilon"):
        create("della", density=0.1, epsilon=0.2)


@pytest.mark.parametrize("name", [n for n in ALL if get(n).stochastic])
def test_randomness_is_seeded_per_seed_round_and_client(name: str) -> None:
    ds = random_deltas(3, SHAPES, seed=10)
    base = merge(name, ds, seed=1, round=2)
    assert_close(base, merge(name, ds, seed=1, round=2), tol=0)
    assert not torch.equal(base["layer.weight"], merge(name, ds, seed=2, round=2)["layer.weight"])
    assert not torch.equal(base["layer.weight"], merge(name, ds, seed=1, round=3)["layer.weight"])


def test_sign_vote_tie_elects_positive() -> None:
    a = {"w": torch.tensor([1.0, -2.0, 3.0])}
    b = {"w": torch.tensor([-1.0, 2.0, -1.0])}
    out = merge("ties", [a, b], density=1.0)["w"]
    # coordinate 0 and 1: the vote sums to 0 → + is elected → the positive entry survives
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 3.0]))
    freq = merge("ties", [a, b], density=1.0, sign_election="frequency")["w"]
    torch.testing.assert_close(freq, torch.tensor([1.0, 2.0, 3.0]))  # every coordinate is a 1:1 tie


def _side(name: str, delta: dict[str, torch.Tensor], keys: list[str]) -> dict[str, object]:
    """Random positive side inputs (a diagonal Fisher) restricted to ``keys``, seeded by the delta."""
    if "fisher" not in get(name).side_inputs:
        return {}
    g = torch.Generator().manual_seed(int(delta[keys[0]].flatten()[0].abs() * 1e6))
    return {"fisher": {k: torch.rand(delta[k].shape, generator=g) + 0.1 for k in keys}}


@pytest.mark.parametrize("name", ALL)
def test_the_tensorwise_flag_tells_whether_a_per_tensor_merge_is_the_whole_merge(name: str) -> None:
    """``tensorwise`` methods merge each tensor with a fresh instance to exactly the whole merge (what the
    rounds' tensor-major fold relies on); the others really do look across tensors."""
    n = clients(name, 5)
    ds = random_deltas(n, SHAPES, seed=11)
    ds[1]["layer.weight"] *= 40  # clients large on one tensor each: whole-delta norms and distances
    ds[-1]["emb"] *= 40  # single out other clients than any one tensor does
    weights = [float(i + 1) for i in range(n)]
    whole = create(name, seed=3, round=2)
    whole.begin(SHAPES)
    for i, (d, w) in enumerate(zip(ds, weights, strict=True)):
        whole.add(d, w, client_id=f"c{i}", **_side(name, d, sorted(SHAPES)))
    expected = whole.finalize()
    per: dict[str, torch.Tensor] = {}
    for key, shape in SHAPES.items():
        one = create(name, seed=3, round=2)
        one.begin({key: shape})
        for i, (d, w) in enumerate(zip(ds, weights, strict=True)):
            full_side = _side(name, d, sorted(SHAPES))
            side = {s: {key: v[key]} for s, v in full_side.items()}  # type: ignore[attr-defined]
            one.add({key: d[key]}, w, client_id=f"c{i}", **side)
        per[key] = one.finalize()[key]
    same = all(torch.equal(per[k], expected[k]) for k in SHAPES)
    assert same == get(name).tensorwise, f"{name}: per-tensor merge equal: {same}"
