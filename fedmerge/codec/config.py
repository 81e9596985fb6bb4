"""The codec settings, validated when constructed.

A :class:`CodecConfig` picks one option per stage: sparsification, value quantisation and index
coding (``auto`` = smallest per tensor), plus error feedback. See ``docs/codec.md`` for how to choose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from fedmerge.errors import ConfigError

Sparsify = Literal["none", "topk", "randomk"]
Scope = Literal["tensor", "global"]
Values = Literal["fp32", "fp16", "bf16", "int8", "int4", "sign"]
IndexCoding = Literal["auto", "coo", "bitmap", "varint", "rice"]
BLOCK_SCALED = ("int8", "int4", "sign")  # value encodings with one fp32 scale per block of values

MAX_BLOCK_SIZE = 1 << 20
MAX_RANK = 1 << 16


@dataclass(frozen=True)
class CodecConfig:
    """How a delta is encoded.

    - ``sparsify``: ``none``; ``topk`` keeps the ⌈density·n⌉ entries of largest magnitude
      (``scope="tensor"``: per tensor; ``"global"``: one threshold over all tensors together);
      ``randomk`` keeps each entry independently with probability ``density`` from a seeded
      generator whose seed is sent instead of indices (DARE, Yu et al. 2024), and with
      ``rescale`` multiplies kept values by 1/density = 1/(1−p) so the estimate is unbiased.
    - ``values``: fp32 (lossless), fp16, bf16, or int8 / int4 with one fp32 scale per
      ``block_size`` consecutive carried values; ``sign`` keeps one bit per value and the block's
      mean magnitude (with ``topk``: sparse ternary compression, Sattler et al. 2019).
    - ``index_coding``: ``auto`` picks the smallest of coo / bitmap / varint / rice per tensor.
    - ``error_feedback``: return the dropped part (input − reconstruction) as the next residual.
    - ``min_sparse_numel``: tensors with fewer elements are sent dense (still quantised).
    - ``seed``: root of the random-k seeds, mixed with client id, round and tensor name.
    - ``rank``: 0 = off; r ≥ 1 sends every 2-D tensor whose rank-r factor pair holds at most half its
      entries as that pair (:mod:`fedmerge.codec.low_rank`: the truncated SVD, P ‖ Q quantised with
      ``values``) instead of sparsifying it; other tensors go through ``sparsify`` as usual.
    - ``deflate``: send the serialized package as one DEFLATE stream when that is smaller
      (:mod:`fedmerge.codec.container`; every decoder reads both forms).
    """

    sparsify: Sparsify = "topk"
    density: float = 0.1
    scope: Scope = "tensor"
    values: Values = "int8"
    block_size: int = 256
    index_coding: IndexCoding = "auto"
    rescale: bool = True
    error_feedback: bool = True
    min_sparse_numel: int = 0
    seed: int = 0
    rank: int = 0
    deflate: bool = False

    def __post_init__(self) -> None:
        _check_choice("sparsify", self.sparsify, Sparsify)
        _check_choice("scope", self.scope, Scope)
        _check_choice("values", self.values, Values)
        _check_choice("index_coding", self.index_coding, IndexCoding)
        if isinstance(self.density, bool) or not isinstance(self.density, int | float):
            raise ConfigError(f"CodecConfig.density must be a number in (0, 1], got {self.density!r}")
        if not 0.0 < float(self.density) <= 1.0:
            raise ConfigError(
                f"CodecConfig.density must be in (0, 1], got {self.density!r}; "
                "use sparsify='none' to send every entry"
            )
        if not isinstance(self.block_size, int) or not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ConfigError(
                f"CodecConfig.block_size must be an int in [1, {MAX_BLOCK_SIZE}], got {self.block_size!r} "
                "(64 to 1024 is typical)"
            )
        if not isinstance(self.min_sparse_numel, int) or self.min_sparse_numel < 0:
            raise ConfigError(
                f"CodecConfig.min_sparse_numel must be an int >= 0, got {self.min_sparse_numel!r}"
            )
        if not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 64:
            raise ConfigError(f"CodecConfig.seed must be an int in [0, 2**64), got {self.seed!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank <= MAX_RANK:
            raise ConfigError(
                f"CodecConfig.rank must be an int in [0, {MAX_RANK}] (0 = no factor pairs), got {self.rank!r}"
            )
        if not isinstance(self.deflate, bool):
            raise ConfigError(f"CodecConfig.deflate must be true or false, got {self.deflate!r}")
        if self.sparsify == "randomk" and self.scope == "global":
            raise ConfigError(
                "CodecConfig.scope='global' applies to topk only; random-k is independent per entry, "
                "use scope='tensor'"
            )

    @property
    def quantised(self) -> bool:
        """True when values are stored as int8/int4/sign with per-block scales."""
        return self.values in BLOCK_SCALED


def _check_choice(field: str, value: object, options: object) -> None:
    allowed = get_args(options)
    if value not in allowed:
        raise ConfigError(f"CodecConfig.{field} must be one of {', '.join(allowed)}; got {value!r}")
