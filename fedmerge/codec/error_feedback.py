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
    return flat + residual.detach().reshape(-1).to(torch.float32)


def residual_after(
    corrected_flat: torch.Tensor,
    indices: torch.Tensor | None,
    reconstructed: torch.Tensor,
    shape: tuple[int, ...],
    *,
    owned: bool = False,
) -> torch.Tensor:
    """e' = c − ĉ, where ĉ is ``reconstructed`` at ``indices`` (or everywhere when indices is None).

    With ``owned`` the codec's own buffer ``corrected_flat`` is overwritten instead of copied.
    """
    if indices is None:
        out = corrected_flat.sub_(reconstructed) if owned else corrected_flat - reconstructed
        return out.reshape(shape)
    out = corrected_flat if owned else corrected_flat.clone()
    out.index_put_((indices,), out.index_select(0, indices).sub_(reconstructed))
    return out.reshape(shape)
