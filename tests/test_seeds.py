"""fedmerge.seeds: the pinned values (computed with the derivations as they were before they moved here,
so moving them changed no stream) and SplitMix64 against a plain-Python reference."""

from __future__ import annotations

import numpy as np
import torch

from fedmerge.aggregators.kernels import seeded_uniform
from fedmerge.codec.sparsify import randomk_indices
from fedmerge.seeds import (
    SPLITMIX_GAMMA,
    derive_generator,
    derive_seed,
    labelled_seed,
    random_k_seed,
    seed_from_ints,
    splitmix64,
)

MASK64 = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    z = (x + SPLITMIX_GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_pinned_derivations() -> None:
    assert derive_seed(7, 3, "client-1", "layer.weight") == 3144694459070247127
    assert random_k_seed(11, "inst-a", 2, "w") == 7740257390653224817
    assert seed_from_ints(0, 1, 2) == 1535930435702422785


def test_derivations_separate_their_inputs() -> None:
    seeds = {derive_seed(0, 1, "c", "w"), derive_seed(1, 1, "c", "w"), derive_seed(0, 2, "c", "w"),
             derive_seed(0, 1, "d", "w"), derive_seed(0, 1, "c", "v")}  # fmt: skip
    assert len(seeds) == 5
    assert all(0 <= s < 1 << 63 for s in seeds)
    assert labelled_seed("dp-local", 1, 2, "c") != labelled_seed("dp-central", 1, 2, "c")


def test_generator_is_reproducible() -> None:
    a = torch.rand(4, generator=derive_generator(1, 2, "c", "w"))
    b = torch.rand(4, generator=derive_generator(1, 2, "c", "w"))
    assert torch.equal(a, b)


def test_splitmix_matches_reference_at_wrapping_states() -> None:
    for x in (0, 1, 12345, MASK64 - 3, 1 << 63):
        assert int(splitmix64(np.uint64(x))) == splitmix64_reference(x)


def test_uniform_stream_and_random_k_positions_follow_splitmix() -> None:
    seed = 0xDEADBEEF12345678
    u = seeded_uniform(6, seed)
    states = [(seed + j * SPLITMIX_GAMMA) & MASK64 for j in range(6)]
    expected = [(splitmix64_reference(s) >> 11) / 2.0**53 for s in states]
    assert u.tolist() == expected
    threshold = 1 << 52  # keep half
    kept, count = randomk_indices(seed, threshold, 64)
    reference = [i for i in range(64) if splitmix64_reference((seed + i) & MASK64) >> 11 < threshold]
    assert kept.tolist() == reference and count == len(reference)
