"""OPCM against an independent transcription of the paper's / FusionBench's loop (full SVD)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from fedmerge.aggregators.continual import create_continual, linear_weight_names, project_out, split_rank
from fedmerge.errors import ConfigError


def fusionbench_project(prev: torch.Tensor, new: torch.Tensor, alpha: float) -> torch.Tensor:
    """FusionBench's merge_linear_weights projection, full SVD, as written there."""
    u, s, vh = torch.linalg.svd(prev.double(), full_matrices=True)
    v = vh.T
    r = int((s.cumsum(dim=0) / s.sum() > alpha).float().argmax().item())
    p = u.T @ new.double() @ v
    p.diagonal().fill_(0)
    p[:r, :r] = 0
    return (u @ p @ v.T).float()


def reference_opcm(
    experts: list[dict[str, torch.Tensor]], alpha: float, linear: set[str]
) -> list[tuple[dict[str, torch.Tensor], float]]:
    """The issue's outline, literally: returns (merged, λ) after every expert."""
    merged = {k: v.double() for k, v in experts[0].items()}
    lam, norms, out = 1.0, [math.sqrt(sum(float(v.double().pow(2).sum()) for v in experts[0].values()))], []
    out.append(({k: v.clone() for k, v in merged.items()}, lam))
    for tau in experts[1:]:
        norms.append(math.sqrt(sum(float(v.double().pow(2).sum()) for v in tau.values())))
        nu = sum(norms) / len(norms)
        S = {}
        for k, prev in merged.items():
            upd = fusionbench_project(prev, tau[k], alpha).double() if k in linear else tau[k].double()
            S[k] = lam * prev + upd
        lam = math.sqrt(sum(float(v.pow(2).sum()) for v in S.values())) / nu
        merged = {k: v / lam for k, v in S.items()}
        out.append(({k: v.clone() for k, v in merged.items()}, lam))
    return out


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (8, 8)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9])
def test_thin_svd_projection_equals_full_svd_projection(shape: tuple[int, int], alpha: float) -> None:
    g = torch.Generator().manual_seed(sum(shape) + int(alpha * 10))
    prev, new = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    torch.testing.assert_close(
        project_out(prev, new, alpha), fusionbench_project(prev, new, alpha), atol=1e-5, rtol=1e-5
    )


def test_naive_thin_reconstruction_would_lose_the_complement() -> None:
    """Why project_out subtracts instead of rebuilding U P Vᵀ: with a tall matrix the rebuild drops a part."""
    g = torch.Generator().manual_seed(3)
    prev, new = torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g)
    U, _, Vh = torch.linalg.svd(prev, full_matrices=False)
    naive = U @ (U.T @ new @ Vh.T) @ Vh  # nothing zeroed, yet not equal to new
    assert not torch.allclose(naive, new, atol=1e-3)
    assert torch.allclose(project_out(prev, new, 0.5), fusionbench_project(prev, new, 0.5), atol=1e-5)


def test_split_rank_follows_fusionbench_rule() -> None:
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumsum/sum = .4 .7 .9 1.0
    assert [split_rank(s, a) for a in (0.0, 0.39, 0.4, 0.5, 0.7, 0.95)] == [0, 0, 1, 1, 2, 3]
    assert split_rank(torch.zeros(3), 0.5) == 0


def orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q[:, :k]


def test_projection_removes_kept_subspace_and_keeps_orthogonal_part() -> None:
    """prev has a known dominant subspace; new = (part inside it) + (part orthogonal to prev entirely)."""
    g = torch.Generator().manual_seed(0)
    Q_left, Q_right = orthonormal(10, 10, g), orthonormal(8, 8, g)
    U, V = Q_left[:, :3], Q_right[:, :3]
    prev = (
        U @ torch.diag(torch.tensor([10.0, 5.0, 1.0])) @ V.T
    )  # ratios .625 .9375 1: α=.7 keeps r=1... see below
    inside = U @ torch.tensor([[2.0, 3.0, 0.0], [-1.0, 4.0, 0.0], [0.0, 0.0, 0.0]]) @ V.T
    outside = Q_left[:, 5:8] @ torch.randn(3, 3, generator=g) @ Q_right[:, 5:8].T
    alpha = 0.7  # cumsum/sum = .625, .9375, 1 → r = 1; with α = .5, r = 0
    out = project_out(prev, inside + outside, alpha)
    Uf, _, Vhf = torch.linalg.svd(prev, full_matrices=False)
    coords = Uf.T @ out @ Vhf.T
    assert split_rank(torch.tensor([10.0, 5.0, 1.0]), alpha) == 1
    torch.testing.assert_close(coords.diagonal(), torch.zeros(coords.shape[0]), atol=1e-5, rtol=0)
    assert abs(float(coords[0, 0])) < 1e-5
    # the off-diagonal coupling between the 1st and 2nd singular directions is kept (outside the 1×1 block)
    assert abs(float(Uf[:, 0] @ out @ Vhf[1])) > 1.0
    # what was removed lies only on the diagonal and in the r×r block of the SVD basis: every other
    # coordinate of the new vector, including its part orthogonal to prev, is kept exactly
    removed = Uf.T @ ((inside + outside) - out) @ Vhf.T
    mask = torch.eye(removed.shape[0], dtype=torch.bool)
    mask[:1, :1] = True
    torch.testing.assert_close(removed[~mask], torch.zeros(int((~mask).sum())), atol=1e-5, rtol=0)
    # (the diagonal is zeroed in the null directions too, in whatever basis the SVD returns, as FusionBench)
    kept = Q_left[:, 5:8].T @ out @ Q_right[:, 5:8]
    assert float(kept.norm()) > 0.5 * float((Q_left[:, 5:8].T @ outside @ Q_right[:, 5:8]).norm())


def test_new_vector_inside_dominant_block_is_removed() -> None:
    g = torch.Generator().manual_seed(1)
    U, V = orthonormal(9, 4, g), orthonormal(7, 4, g)
    prev = U @ torch.diag(torch.tensor([8.0, 7.0, 6.0, 0.5])) @ V.T  # .37 .70 .98 1 → α=.9: r = 2
    new = U[:, :2] @ torch.randn(2, 2, generator=g) @ V[:, :2].T
    torch.testing.assert_close(project_out(prev, new, 0.9), torch.zeros(9, 7), atol=1e-5, rtol=0)


LINEAR = {"fc1.weight", "fc2.weight"}


def test_matches_reference_loop_and_keeps_norm_at_mean_task_norm(
    experts: list[dict[str, torch.Tensor]],
) -> None:
    merger = create_continual("opcm", alpha=0.5)
    reference = reference_opcm(experts, 0.5, LINEAR)
    norms = []
    for t, tau in enumerate(experts):
        merged = merger.add_expert(tau)
        norms.append(math.sqrt(sum(float(v.double().pow(2).sum()) for v in tau.values())))
        ref_merged, ref_lambda = reference[t]
        for k in tau:
            torch.testing.assert_close(merged[k].double(), ref_merged[k], atol=1e-5, rtol=1e-4)
        assert merger.lambda_t == pytest.approx(ref_lambda, rel=1e-5)  # type: ignore[attr-defined]
        merged_norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in merged.values()))
        assert merged_norm == pytest.approx(sum(norms) / len(norms), rel=1e-5)  # ‖τ⁽ᵗ⁾‖ = ν


def test_lambda_grows_as_sqrt_t_for_orthogonal_equal_norm_experts() -> None:
    """Disjoint supports, equal norms, no linear weight: ‖S‖² = λ²ν² + ν² ⇒ λ_t = √t exactly."""
    merger = create_continual("opcm")
    for t in range(1, 10):
        tau = {"bias": torch.zeros(9)}
        tau["bias"][t - 1] = 2.0
        merger.add_expert(tau)
        assert merger.lambda_t == pytest.approx(math.sqrt(t), rel=1e-6)  # type: ignore[attr-defined]


def test_order_matters_for_linear_weights_only(make_expert: Callable[..., dict[str, torch.Tensor]]) -> None:
    a, b = make_expert(1), make_expert(2)
    ab = create_continual("opcm")
    ab.add_expert(a)
    out_ab = ab.add_expert(b)
    ba = create_continual("opcm")
    ba.add_expert(b)
    out_ba = ba.add_expert(a)
    lam_ab, lam_ba = ab.lambda_t, ba.lambda_t  # type: ignore[attr-defined]
    for k in ("fc1.bias", "norm.weight", "embed.weight"):  # added: S = τ_a + τ_b both ways (λ₁ = 1)
        torch.testing.assert_close(out_ab[k] * lam_ab, out_ba[k] * lam_ba)
    assert not torch.allclose(out_ab["fc1.weight"], out_ba["fc1.weight"], atol=1e-3)


def test_first_expert_is_merged_unchanged(make_expert: Callable[..., dict[str, torch.Tensor]]) -> None:
    tau = make_expert(5)
    out = create_continual("opcm").add_expert(tau)
    assert all(torch.equal(out[k], tau[k]) for k in tau)


def test_linear_weight_names_follow_module_types() -> None:
    model = nn.ModuleDict(
        {
            "emb": nn.Embedding(10, 4),
            "proj": nn.Linear(4, 3),
            "ln": nn.LayerNorm(3),
            "conv": nn.Conv1d(3, 3, 1),
        }
    )
    assert linear_weight_names(model) == ["proj.weight"]


def test_default_rule_adds_embeddings_and_explicit_list_overrides(
    make_expert: Callable[..., dict[str, torch.Tensor]],
) -> None:
    a, b = make_expert(1), make_expert(2)
    m = create_continual("opcm")
    assert m.is_linear("fc1.weight", (12, 6)) and not m.is_linear("embed.weight", (11, 6))  # type: ignore[attr-defined]
    assert not m.is_linear("fc1.bias", (12,))  # type: ignore[attr-defined]
    only_fc2 = create_continual("opcm", linear_weights=["fc2.weight"])
    only_fc2.add_expert(a)
    out = only_fc2.add_expert(b)
    lam = only_fc2.lambda_t  # type: ignore[attr-defined]
    torch.testing.assert_close(out["fc1.weight"], (a["fc1.weight"] + b["fc1.weight"]) / lam)


@pytest.mark.parametrize("alpha", [1.0, -0.1, float("nan"), "x"])
def test_bad_alpha_is_a_config_error(alpha: object) -> None:
    with pytest.raises(ConfigError, match="alpha"):
        create_continual("opcm", alpha=alpha)


def test_unknown_linear_weight_is_named(make_expert: Callable[..., dict[str, torch.Tensor]]) -> None:
    m = create_continual("opcm", linear_weights=["fc9.weight"])
    with pytest.raises(ConfigError, match=r"fc9\.weight"):
        m.add_expert(make_expert(0))
    m2 = create_continual("opcm", linear_weights=["fc1.bias"])
    with pytest.raises(ConfigError, match=r"fc1\.bias.*2-D"):
        m2.add_expert(make_expert(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_gpu_and_agrees_with_cpu(experts: list[dict[str, torch.Tensor]]) -> None:
    cpu, gpu = create_continual("opcm"), create_continual("opcm", device="cuda")
    for tau in experts:
        a, b = cpu.add_expert(tau), gpu.add_expert(tau)
    for k in a:
        torch.testing.assert_close(b[k].cpu(), a[k], atol=1e-4, rtol=1e-3)
