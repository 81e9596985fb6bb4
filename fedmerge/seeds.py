"""Seeds and counter-based random streams: the one home of every derivation fedmerge uses.

Every random choice in fedmerge is a pure function of public inputs, so any party that holds them
(a client, the server, a replay of a simulation) regenerates it exactly, on any platform:

* :func:`derive_seed` — (seed, round, client, tensor name) → 63 bits, BLAKE2b. Seeds the per-client,
  per-tensor ``torch.Generator`` of the aggregators (DARE and DELLA masks, :func:`derive_generator`).
* :func:`random_k_seed` — (root seed, client id, round, tensor name) → 64 bits, SHA-256. The seed of a
  seeded random-k package: the server regenerates the kept positions from it, so it is part of wire
  format 1 (``protos/fedmerge/v1/delta.proto``) and never changes within that format.
* :func:`seed_from_ints` — integers → 63 bits with ``numpy.random.SeedSequence`` (simulations: local
  training batches, synthetic data, pre-training).
* :func:`seed_from_generator` — one 62-bit draw from a ``torch.Generator`` (so derived and
  caller-given generators both work where a kernel needs an integer seed).
* :func:`labelled_digest` — SHA-256 of ``"label/part/part…"`` for streams named by a purpose
  (``"dp-local"``, ``"dp-central"``, ``"fault"``), from which a seed or a ``random.Random`` is made.
* SplitMix64 (Steele, Lea & Flood 2014), counter-based: output j of the stream seeded with s is
  ``splitmix64(s + j·γ)`` (γ = 0x9E3779B97F4A7C15). :func:`splitmix64` and :func:`splitmix_uniform` are
  numba functions, callable from kernels; the codec's random-k positions and the aggregators' DARE
  masks both draw from it.
"""

from __future__ import annotations

import hashlib

import numba
import numpy as np
import torch

SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_MIX1 = 0xBF58476D1CE4E5B9
SPLITMIX_MIX2 = 0x94D049BB133111EB
_GAMMA = np.uint64(SPLITMIX_GAMMA)
_MIX1 = np.uint64(SPLITMIX_MIX1)
_MIX2 = np.uint64(SPLITMIX_MIX2)
TWO_POW_53 = 9007199254740992.0


def derive_seed(seed: int, round: int, client: str | int, name: str = "") -> int:
    """A 63-bit seed from (seed, round, client, tensor name): BLAKE2b-64 of ``"seed|round|client|name"``."""
    digest = hashlib.blake2b(f"{seed}|{round}|{client}|{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def derive_generator(
    seed: int, round: int, client: str | int, name: str = "", device: torch.device | str = "cpu"
) -> torch.Generator:
    """A fresh ``torch.Generator`` seeded by :func:`derive_seed`."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, round, client, name))


def random_k_seed(root: int, client_id: str, round_: int, name: str) -> int:
    """The 64-bit seed of one tensor of a seeded random-k package: the first 8 bytes (little endian) of
    SHA-256(``"root\\0client\\0round\\0name"``). Fixed by wire format 1."""
    digest = hashlib.sha256(f"{root}\0{client_id}\0{round_}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def seed_from_ints(*parts: int) -> int:
    """A 63-bit seed derived from integers (e.g. seed, round, client) with ``numpy.random.SeedSequence``."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def seed_from_generator(generator: torch.Generator) -> int:
    """A 62-bit seed drawn from ``generator``."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def labelled_digest(label: object, *parts: object) -> bytes:
    """SHA-256 of ``"label/part1/part2/…"``: the root of a stream named by its purpose."""
    return hashlib.sha256("/".join(str(p) for p in (label, *parts)).encode()).digest()


def labelled_seed(label: object, *parts: object) -> int:
    """A 63-bit seed: the first 8 bytes (little endian) of :func:`labelled_digest`, shifted right once."""
    return int.from_bytes(labelled_digest(label, *parts)[:8], "little") >> 1


@numba.njit(cache=True, nogil=True)
def splitmix64(x: np.uint64) -> np.uint64:
    """SplitMix64's output for state ``x``: z = x + γ, then two xor-shift-multiply rounds."""
    z = x + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def splitmix_uniform(seed: np.uint64, j: int) -> float:
    """Output j of SplitMix64 seeded with ``seed``, as a uniform double in [0, 1): top 53 bits / 2^53."""
    z = splitmix64(seed + np.uint64(j) * _GAMMA)
    return np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


__all__ = [
    "SPLITMIX_GAMMA",
    "SPLITMIX_MIX1",
    "SPLITMIX_MIX2",
    "derive_generator",
    "derive_seed",
    "labelled_digest",
    "labelled_seed",
    "random_k_seed",
    "seed_from_generator",
    "seed_from_ints",
    "splitmix64",
    "splitmix_uniform",
]
