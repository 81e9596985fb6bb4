"""Error feedback (Seide et al. 2014; Stich et al. 2018, "Sparsified SGD with Memory").

The client keeps what the lossy stages dropped and adds it to the next round's delta::

    c_t = δ_t + e_t          (corrected delta, what is actually encoded)
    ĉ_t = decode(encode(c_t))
    e_{t+1} = c_t − ĉ_t      (new residual)

so Σ_t ĉ_t = Σ_t δ_t − e_{T+1}: nothing is lost, only delayed. The state is explicit: the caller
passes ``residual`` in and receives the new one in :class:`~fedmerge.codec.package.EncodeResult`;
nothing is kept inside the codec. Keep it per client (e.g. Flower's ``context.state``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numba
import numpy as np
import torch

from fedmerge.errors import CodecError


def check_residual(residual: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise :class:`CodecError` if ``residual`` has a tensor the delta lacks or a different shape."""
    for name, tensor in residual.items():
        if name not in shapes:
            raise CodecError(
                f"residual has tensor {name!r} that the delta does not have; pass the residual returned by "
                "the previous encode of the same model"
            )
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise CodecError(
                f"residual tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the delta has {tuple(shapes[name])}"
            )


def corrected(delta: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """c = δ + e as a flat contiguous fp32 tensor (δ itself, without copy, when there is no residual)."""
    flat = delta.detach().reshape(-1).to(torch.float32).contiguous()
    if residual is None:
        return flat
    e = residual.detach().reshape(-1).to(torch.float32).contiguous()
    out = np.empty(flat.numel(), dtype=np.float32)
    _add(flat.numpy(), e.numpy(), out)
    return torch.from_numpy(out)


def residual_after(
    corrected_flat: torch.Tensor,
    indices: torch.Tensor | None,
    reconstructed: torch.Tensor,
    shape: tuple[int, ...],
    *,
    owned: bool = False,
) -> torch.Tensor:
    """e' = c − ĉ, where ĉ is ``reconstructed`` at ``indices`` (or everywhere when indices is None).

    With ``owned`` the codec's own buffer ``corrected_flat`` is overwritten instead of copied. The
    fp32 subtractions are the IEEE ones of ``torch.sub``; they run in single-threaded kernels that
    release the GIL, so no intra-op thread pool is woken for them.
    """
    c = corrected_flat.detach().contiguous()
    c_np = c.numpy()
    rec = reconstructed.detach().to(torch.float32).contiguous().numpy()
    out = c_np if owned and c.data_ptr() == corrected_flat.data_ptr() else np.empty_like(c_np)
    if indices is None:
        _sub(c_np, rec, out)
    else:
        if out is not c_np:
            _copy(c_np, out)
        _sub_at(out, indices.to(torch.int64).contiguous().numpy(), rec)
    return (corrected_flat if out is c_np else torch.from_numpy(out)).reshape(shape)


@numba.njit(cache=True, nogil=True)
def _add(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out = a + b (fp32)."""
    for i in range(np.uint64(out.size)):
        out[i] = a[i] + b[i]


@numba.njit(cache=True, nogil=True)
def _sub(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out = a − b (fp32); ``out`` may be ``a``."""
    for i in range(np.uint64(out.size)):
        out[i] = a[i] - b[i]


@numba.njit(cache=True, nogil=True)
def _copy(a: np.ndarray, out: np.ndarray) -> None:
    """out = a."""
    for i in range(np.uint64(out.size)):
        out[i] = a[i]


@numba.njit(cache=True, nogil=True)
def _sub_at(out: np.ndarray, indices: np.ndarray, values: np.ndarray) -> None:
    """out[indices[j]] −= values[j] (fp32) for every j; indices are unique."""
    for j in range(np.uint64(indices.size)):
        i = indices[j]
        out[i] = out[i] - values[j]
