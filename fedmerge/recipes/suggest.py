"""Which merge method to try first (``fedmerge merge --suggest``), from fedmerge's own measurements.

Each suggestion names its evidence: ``python -m bench merging`` (8 tasks, 5 seeds, full fine-tunes and
peft LoRA experts of a pre-trained body; bench/RESULTS.md, "Multi-task merging", JSON in
docs/results/merging/merging.json) and the simulated federations of docs/results/ (non-IID digits,
20 clients). ``tests/recipes/test_suggest.py`` checks the first two against that JSON, so a
benchmark rerun that changes the winner fails until this table is updated.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Suggestion:
    """The method to try first for one kind of merge, its settings, and why."""

    setting: str
    method: str
    params: str
    evidence: str


SUGGESTIONS: tuple[Suggestion, ...] = (
    Suggestion(
        "full fine-tunes (task vectors)",
        "tsv_m",
        "scaling 0.5 (its default 1.0 is within a std)",
        "bench merging: 62.7 % of the experts against 55.8 (fisher), 54.4 (iso_c), 50.8 (task arithmetic, "
        "λ 0.1), 48.8 (ties); then iso_c at its default",
    ),
    Suggestion(
        "LoRA adapters",
        "model_stock",
        "default (scaling 2.0 was chosen at 4 of 5 seeds, +1 point)",
        "bench merging, LoRA experts: 50.7 % against 48.0 (karcher, multislerp at scaling 0.25), 46.1 "
        "(task arithmetic); for TIES, merge in core space (core_space_merge: +12.9 points over TIES on "
        "the products)",
    ),
    Suggestion(
        "federated rounds (non-IID clients)",
        "fedavg",
        "default; ties with scaling 0.5 is within the seed spread",
        "docs/results/digits-dirichlet0.1.md: fedavg 68.4 ± 10.5, ties λ 0.5 67.6 ± 3.6, ties 55.9, "
        "dare_ties 47.0 (20 clients, Dirichlet α = 0.1, 3 seeds)",
    ),
)


def suggestion_lines() -> list[str]:
    """The table as printed by ``fedmerge merge --suggest``: one block per setting."""
    lines = []
    for s in SUGGESTIONS:
        lines += [f"{s.setting}: {s.method} — {s.params}", f"  evidence: {s.evidence}"]
    return lines
