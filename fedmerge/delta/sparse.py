"""A sparse tensor as clients send it after top-k or random-k sparsification.

The flat (row-major) indices are sorted and unique; values have any floating dtype. Aggregators
accept a :class:`SparseTensor` wherever they accept a dense tensor and fold only its non-zeros,
so the server's work scales with what the client actually sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmerge.errors import IncompatibleDeltasError


@dataclass(frozen=True)
class SparseTensor:
    """``shape``-shaped tensor that is zero except at the flat ``indices`` where it holds ``values``."""

    indices: torch.Tensor  # int64 (or int32), 1-D, sorted, unique, in [0, numel)
    values: torch.Tensor  # floating, 1-D, same length as indices
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.indices.dim() != 1 or self.values.dim() != 1 or len(self.indices) != len(self.values):
            raise IncompatibleDeltasError(
                f"SparseTensor needs 1-D indices and values of equal length, got "
                f"{tuple(self.indices.shape)} and {tuple(self.values.shape)}"
            )

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=dtype or self.values.dtype, device=self.values.device)
        out[self.indices.long()] = self.values.to(out.dtype)
        return out.reshape(self.shape)

    @staticmethod
    def from_dense(tensor: torch.Tensor) -> SparseTensor:
        flat = tensor.reshape(-1)
        idx = torch.nonzero(flat, as_tuple=False).reshape(-1)
        return SparseTensor(indices=idx, values=flat[idx].clone(), shape=tuple(tensor.shape))
