"""The corpus itself: every class of the issue is covered, names are unique, builds are deterministic."""

from __future__ import annotations

import re

import pytest
import torch

from fedmerge.codec import CodecConfig, PackageMeta, decode_package
from fedmerge.codec.errors import DeclaredSizeTooLarge
from fedmerge_testing.hostile import (
    CASES,
    CLASSES,
    ENTRY_POINTS,
    Attack,
    Valid,
    cases_for,
    synthetic_delta,
)

REQUIRED = (
    "truncated", "random", "magic/version", "nan/inf", "huge sizes", "index range", "duplicate indices",
    "shapes", "names", "stale", "replay", "oversized", "slow-loris", "unauthenticated", "wrong auth",
    # classes added after intake reproductions
    "magnitude", "metrics", "completeness", "merge failure", "expansion",
)  # fmt: skip


def _valid() -> Valid:
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(24, 8, generator=g), "a.bias": torch.randn(24, generator=g)}
    meta = PackageMeta("c", 3, "v000001", "h" * 64, num_examples=5)
    codec = CodecConfig(density=0.5, values="int8")
    from fedmerge.codec import encode_package

    peer = encode_package(synthetic_delta(base, 0), codec, meta=meta).data
    return Valid(base, synthetic_delta(base, 1), meta, codec, peer, "c0", "v000000", 1 << 20)


def test_every_class_of_the_issue_has_cases_at_an_entry_point() -> None:
    for klass in REQUIRED:
        assert klass in CLASSES
        assert [c for c in CASES if c.klass == klass], klass
    assert {c.klass for c in CASES} == set(CLASSES)  # no class without a case
    assert len({c.name for c in CASES}) == len(CASES)
    for entry in ENTRY_POINTS:
        assert len(cases_for(entry)) >= 20
    for c in CASES:
        assert c.entry_points and set(c.gaps) <= set(c.expect)
        for pattern in c.expect.values():
            re.compile(pattern)


def _fields(attack: Attack) -> dict[str, object]:
    out = dict(attack.__dict__)
    out["dense"] = None if attack.dense is None else {k: v.tobytes() for k, v in attack.dense.items()}
    return out


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_build_is_deterministic_and_differs_from_the_valid_input(name: str) -> None:
    valid = _valid()
    case = next(c for c in CASES if c.name == name)
    first, again = _fields(case.build(valid)), _fields(case.build(valid))
    assert first == again
    honest = _fields(Attack(valid.data))
    changed = {k for k in first if first[k] != honest[k]}
    assert changed, f"{name} sends exactly what an honest client sends"


def test_resigned_mutations_pass_the_checksum_and_fail_on_what_they_target() -> None:
    valid = _valid()
    expected = {
        "nan-value": "NonFiniteValues",
        "inf-block-scale": "NonFiniteValues",
        "index-out-of-range": "InvalidIndices",
        "duplicate-index": "InvalidIndices",
        "huge-shape": "DeclaredSizeTooLarge",
        "wrong-format-version": "UnsupportedFormatVersion",
        "tampered-values": "ChecksumMismatch",
    }
    for name, error in expected.items():
        payload = next(c for c in CASES if c.name == name).build(valid).payload
        assert payload is not None
        with pytest.raises(Exception) as info:
            decode_package(payload)
        assert type(info.value).__name__ == error, (name, info.value)


@pytest.mark.parametrize("name", ["coo-one-entry-2^28", "seeded-randomk-2^28"])
def test_expansion_packages_are_tiny_and_refused_on_their_declared_shape_given_the_base(name: str) -> None:
    valid = _valid()
    payload = next(c for c in CASES if c.name == name).build(valid).payload
    assert payload is not None and len(payload) < 512
    with pytest.raises(DeclaredSizeTooLarge, match=r"\(268435456,\).*refused before allocation"):
        decode_package(payload, expected_shapes={k: tuple(t.shape) for k, t in valid.base.items()})
