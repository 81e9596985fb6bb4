"""Core Space merging and KnOTS: losslessness, equality with dense merges when the merge is linear,
and agreement with plain transcriptions of the reference implementations on random factors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedmerge.aggregators import merge
from fedmerge.aggregators.core_space import core_space_bases, core_space_matrix, core_space_merge
from fedmerge.aggregators.knots import knots_matrix, knots_merge
from fedmerge.delta.lora import LoraAdapter, LoraModule, load_peft_adapter, save_peft_adapter
from fedmerge.errors import IncompatibleDeltasError, UnknownAggregatorError

MergeFn = Callable[..., LoraAdapter]


def factors(seed: int, m: int, n: int, ranks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g) / r) for r in ranks]


def adapters(seed: int, ranks: list[int]) -> list[LoraAdapter]:
    """Two modules of different shapes, heterogeneous ranks, peft scaling α/r with α = 8."""
    shapes = {"layers.0.q_proj.weight": (24, 16), "layers.0.v_proj.weight": (12, 20)}
    out = []
    for i, r in enumerate(ranks):
        mods = {}
        for j, (name, (m, n)) in enumerate(shapes.items()):
            ((a, b),) = factors(seed + 97 * i + j, m, n, [r])
            mods[name] = LoraModule(a, b, 8.0 / r)
        out.append(LoraAdapter(mods, r, 8.0, ("q_proj", "v_proj")))
    return out


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


# --------------------------------------------------------------------- plain reference transcriptions


def reference_core(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The reference's get_core_matrices: per-task SVDs of A_i and B_i, cores aligned to the stacks'
    bases (M = Σ_B V_Bᵀ U_A Σ_A, then R_B M Q_A)."""
    a_list, b_list = zip(*pairs, strict=True)
    a_stack = torch.cat(a_list, dim=0)
    b_stack = torch.cat(b_list, dim=1)
    vh_a_ref = torch.linalg.svd(a_stack.to(torch.float64), full_matrices=False)[2]
    u_b_ref = torch.linalg.svd(b_stack.to(torch.float64), full_matrices=False)[0]
    m_list = []
    for a, b in zip(a_list, b_list, strict=True):
        u_a, s_a, vh_a = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
        u_b, s_b, vh_b = torch.linalg.svd(b.to(torch.float64), full_matrices=False)
        q_a = vh_a @ vh_a_ref.T
        r_b = u_b_ref.T @ u_b
        core = torch.diag(s_b) @ (vh_b @ u_a) @ torch.diag(s_a)
        m_list.append(r_b @ core @ q_a)
    return m_list, u_b_ref, vh_a_ref


def reference_knots(deltas: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference's SVDMerger.apply_svd: SVD of the concatenation, s > 1e-5 kept, V split per task
    and multiplied by diag(s)."""
    stack = torch.cat(deltas, dim=1)
    u, s, v = torch.linalg.svd(stack.to(torch.float64), full_matrices=False)
    u, v, s = u[:, s > 1e-5], v[s > 1e-5], s[s > 1e-5]
    width = v.shape[1] // len(deltas)
    return u, [torch.diag(s) @ vi for vi in torch.split(v, width, dim=1)]


def merged_by(method: str, mats: list[torch.Tensor], weights: list[float], **params: object) -> torch.Tensor:
    return merge(method, [{"x": x.float()} for x in mats], weights, **params)["x"].double()


# ------------------------------------------------------------------------------------------ core space


@pytest.mark.parametrize(("m", "n", "ranks"), [(24, 16, [2, 3, 5]), (10, 8, [4, 4, 3]), (30, 6, [1, 2])])
def test_core_projection_is_lossless(m: int, n: int, ranks: list[int]) -> None:
    pairs = factors(1, m, n, ranks)
    u_b, v_a = core_space_bases(pairs)
    assert u_b.shape == (m, min(m, sum(ranks))) and v_a.shape == (min(n, sum(ranks)), n)
    for a, b in pairs:
        dw = b.double() @ a.double()
        core = u_b.T @ dw @ v_a.T
        assert rel(u_b @ core @ v_a, dw) < 1e-12


def test_core_task_arithmetic_equals_dense_task_arithmetic() -> None:
    ads = adapters(3, [2, 4, 7])
    ws = [1.0, 2.0, 0.5]
    out = core_space_merge(ads, ws, "task_arithmetic", scaling=0.7)
    dense = merge(
        "task_arithmetic", [{k: m.delta() for k, m in ad.modules.items()} for ad in ads], ws, scaling=0.7
    )
    for name, mod in out.modules.items():
        assert rel(mod.delta(), dense[name]) < 1e-5
    assert out.modules["layers.0.q_proj.weight"].rank == 13  # Σ r_i, below min(m, n) = 16
    assert out.modules["layers.0.v_proj.weight"].rank == 12  # min(m, n, Σ r_i) with m = 12


@pytest.mark.parametrize(("method", "params"), [("task_arithmetic", {}), ("ties", {"density": 0.3})])
def test_core_matches_reference_transcription(method: str, params: dict[str, object]) -> None:
    pairs = factors(5, 20, 14, [3, 5, 2])
    ws = [1.0, 1.0, 1.0]
    m_list, u_ref, vh_ref = reference_core(pairs)
    expected = u_ref @ merged_by(method, m_list, ws, **params) @ vh_ref
    b, a = core_space_matrix(pairs, ws, method, **params)
    assert rel(b @ a, expected) < 1e-5


def test_core_iso_c_matches_reference_isotropized_sum() -> None:
    """The reference's core-space Iso-C: the summed cores with every singular value set to their mean."""
    pairs = factors(21, 20, 14, [2, 3, 4])
    m_list, u_ref, vh_ref = reference_core(pairs)
    u, s, vh = torch.linalg.svd(torch.stack(m_list).sum(0), full_matrices=False)
    expected = u_ref @ (u * s.mean()) @ vh @ vh_ref
    b, a = core_space_matrix(pairs, [1.0, 1.0, 1.0], "iso_c")
    assert rel(b @ a, expected) < 1e-5


def test_core_ties_differs_from_dense_ties() -> None:
    """Non-linear merges act on the aligned cores, not on the m × n products."""
    pairs = factors(7, 20, 14, [3, 3, 3])
    ws = [1.0, 1.0, 1.0]
    b, a = core_space_matrix(pairs, ws, "ties", density=0.3)
    dense = merged_by("ties", [bb @ aa for aa, bb in pairs], ws, density=0.3)
    assert rel(b @ a, dense) > 1e-2


def test_core_iso_c_flattens_the_core_spectrum() -> None:
    pairs = factors(9, 20, 14, [2, 2, 2])
    b, a = core_space_matrix(pairs, [1.0, 1.0, 1.0], "iso_c")
    s = torch.linalg.svdvals((b @ a).double())
    s = s[s > 1e-6 * s[0]]
    assert len(s) == 6 and float(s.max() / s.min()) < 1 + 1e-4
    total = torch.stack([bb @ aa for aa, bb in pairs]).sum(0)
    assert abs(float(s.mean()) - float(torch.linalg.svdvals(total.double()).sum()) / 6) < 1e-4 * float(
        s.mean()
    )


# ------------------------------------------------------------------------------------------------ KnOTS


@pytest.mark.parametrize(("method", "params"), [("task_arithmetic", {}), ("ties", {"density": 0.25})])
def test_knots_matches_reference_transcription(method: str, params: dict[str, object]) -> None:
    deltas = [b @ a for a, b in factors(11, 18, 15, [4, 2, 3])]
    ws = [1.0, 1.0, 1.0]
    u, parts = reference_knots(deltas)
    expected = u @ merged_by(method, parts, ws, **params)
    b, a = knots_matrix(deltas, ws, method, **params)
    assert b.shape[1] == 9  # Σ r_i shared directions
    assert rel(b @ a, expected) < 1e-5


def test_knots_from_factors_matches_reference_on_dense_updates() -> None:
    """knots_merge never forms the m × T·n concatenation; it agrees with the reference's dense SVD."""
    ads = adapters(31, [4, 2, 5])
    out = knots_merge(ads, None, "ties", density=0.3)
    for name, mod in out.modules.items():
        u, parts = reference_knots([ad.modules[name].delta() for ad in ads])
        expected = u @ merged_by("ties", parts, [1.0, 1.0, 1.0], density=0.3)
        assert mod.rank == 11
        assert rel(mod.delta(), expected) < 1e-5


def test_knots_linear_merge_equals_dense_task_arithmetic() -> None:
    ads = adapters(13, [3, 1, 6])
    ws = [0.2, 0.5, 0.3]
    out = knots_merge(ads, ws, "task_arithmetic", normalize=True)
    dense = merge(
        "task_arithmetic", [{k: m.delta() for k, m in ad.modules.items()} for ad in ads], ws, normalize=True
    )
    for name, mod in out.modules.items():
        assert rel(mod.delta(), dense[name]) < 1e-5


def test_knots_ties_differs_from_dense_ties() -> None:
    deltas = [b @ a for a, b in factors(17, 18, 15, [3, 3, 3])]
    ws = [1.0, 1.0, 1.0]
    b, a = knots_matrix(deltas, ws, "ties", density=0.3)
    assert rel(b @ a, merged_by("ties", deltas, ws, density=0.3)) > 1e-2


# ----------------------------------------------------------------------------------- adapters and input


@pytest.mark.parametrize("merge_fn", [core_space_merge, knots_merge])
def test_merged_adapter_round_trips_through_peft_files(merge_fn: MergeFn, tmp_path: Path) -> None:
    ads = adapters(19, [2, 5])
    out = merge_fn(ads, None, "ties", density=0.5)
    save_peft_adapter(out, tmp_path)
    back = load_peft_adapter(tmp_path)
    for name, mod in out.modules.items():
        assert rel(back.modules[name].delta(), mod.delta()) < 1e-6


@pytest.mark.parametrize("merge_fn", [core_space_merge, knots_merge])
def test_zero_adapters_merge_to_a_saveable_zero_adapter(merge_fn: MergeFn, tmp_path: Path) -> None:
    ads = adapters(29, [2, 3])
    for ad in ads:
        for mod in ad.modules.values():
            mod.B.zero_()
    out = merge_fn(ads, None, "ties", density=0.5)
    save_peft_adapter(out, tmp_path)
    back = load_peft_adapter(tmp_path)
    for name, mod in back.modules.items():
        assert mod.rank >= 1 and torch.count_nonzero(mod.delta()) == 0, name


@pytest.mark.parametrize("merge_fn", [core_space_merge, knots_merge])
def test_bad_input_is_named(merge_fn: MergeFn) -> None:
    ads = adapters(23, [2, 2])
    del ads[1].modules["layers.0.v_proj.weight"]
    with pytest.raises(IncompatibleDeltasError, match="v_proj"):
        merge_fn(ads)
    with pytest.raises(UnknownAggregatorError, match="no aggregator named 'nope'"):
        merge_fn(adapters(23, [2, 2]), None, "nope")
