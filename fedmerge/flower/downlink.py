"""Compressed downlink: send clients the change of the model, not the model.

After a round the server holds the merged update Δ. Instead of broadcasting the new weights, it
encodes Δ with the codec, with its own error-feedback residual R (bidirectional compression, as in
DoubleSqueeze, Tang et al. 2019, and EF21-P, Gruntkowska et al. 2023)::

    package = encode(Δ + R);   Δ̂ = decode(package);   R ← Δ + R − Δ̂
    θ_{k+1} = θ_k + Δ̂                      (committed as the version's delta: exactly what clients hold)

A client that holds θ_k applies the package and obtains θ_{k+1} bit for bit: both sides compute the
same fp32 addition of the same decoded values. :func:`weights_digest` (sha256 of the weights)
travels with the package so a client verifies the result; on a mismatch it asks for full weights.
Nothing the clients sent is lost: what the downlink drops this round stays in R for the next.

Only what changed travels, both ways: a tensor whose update and residual are zero everywhere is left
out of the package (:func:`changed_tensors`; a package's missing tensor is zero change, as for any
partial task vector), so a LoRA round's untouched weights cost no bytes up or down.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

from fedmerge.codec import CodecConfig, PackageMeta, decode_package, encode_package
from fedmerge.delta.sparse import SparseTensor
from fedmerge.delta.state_dict import StateDict
from fedmerge.errors import InvalidSubmission


class UpdateMismatch(InvalidSubmission):
    """Applying a downlink update did not reproduce the server's weights (wrong parent or corrupt)."""


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order."""
    return weights_digest_of((name, weights[name]) for name in sorted(weights))


def weights_digest_of(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """:func:`weights_digest` of (name, tensor) pairs that arrive in name order, one at a time (e.g.
    :meth:`~fedmerge.store.ModelStore.iter_materialized`): memory is one tensor. ValueError when the
    names are not strictly increasing (the digest would not be the one of the state dict)."""
    h = hashlib.sha256()
    previous: str | None = None
    for name, tensor in tensors:
        if previous is not None and name <= previous:
            raise ValueError(f"tensor {name!r} after {previous!r}: the digest needs names in sorted order")
        previous = name
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _dense(
    tensors: Mapping[str, torch.Tensor | SparseTensor], shapes: Mapping[str, tuple[int, ...]]
) -> StateDict:
    return {
        k: (v.to_dense(torch.float32) if isinstance(v, SparseTensor) else v.float()).reshape(shapes[k])
        for k, v in tensors.items()
    }


def changed_tensors(
    update: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None
) -> tuple[StateDict, StateDict | None]:
    """(the tensors of ``update`` that carry something, their residuals): a tensor whose update and
    residual (when there is one) are exactly zero everywhere is left out, its residual with it (zero
    stays zero). At least one tensor is kept, so a package is never empty."""
    res = residual or {}
    kept = {k: t for k, t in update.items() if bool(t.any()) or (k in res and bool(res[k].any()))}
    if not kept and update:
        first = min(update)
        kept = {first: update[first]}
    return kept, ({k: v for k, v in res.items() if k in kept} if residual else None)


def compress_update(
    update: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor] | None,
    codec: CodecConfig,
    meta: PackageMeta,
) -> tuple[bytes, StateDict, StateDict]:
    """(package bytes, Δ̂ the decoded update clients will apply — zero for every tensor left out
    (:func:`changed_tensors`) — new server residual R)."""
    kept, kept_residual = changed_tensors(update, residual)
    result = encode_package(kept, codec, meta=meta, residual=kept_residual)
    shapes = {k: tuple(v.shape) for k, v in update.items()}
    decoded = decode_package(result.data, expected_shapes=shapes, allow_missing=True).tensors
    applied = _dense(decoded, shapes)
    for k in shapes.keys() - applied.keys():
        applied[k] = torch.zeros(shapes[k], dtype=torch.float32)
    return result.data, applied, dict(result.residual)


def apply_weights(base: Mapping[str, torch.Tensor], applied: Mapping[str, torch.Tensor]) -> StateDict:
    """θ + Δ̂ in fp32, cast back to each tensor's dtype; tensors without an update are copied."""
    return {
        k: (t.float() + applied[k]).to(t.dtype) if k in applied and t.is_floating_point() else t.clone()
        for k, t in base.items()
    }


def applied_update(base: Mapping[str, torch.Tensor], package: bytes) -> StateDict:
    """θ + Δ̂: decode the package against the held weights' shapes and add it (not yet verified)."""
    shapes = {k: tuple(t.shape) for k, t in base.items() if t.is_floating_point()}
    decoded = decode_package(package, expected_shapes=shapes, allow_missing=True)  # missing: unchanged
    return apply_weights(base, _dense(decoded.tensors, shapes))


def check_update_digest(digest: str, expected_digest: str) -> None:
    """:class:`UpdateMismatch` when the rebuilt weights' digest is not the one the server announced."""
    if digest != expected_digest:
        raise UpdateMismatch(
            f"applying the downlink update gave weights {digest[:12]}…, the server has "
            f"{expected_digest[:12]}…: this node holds a different parent version; "
            "the server will send full weights"
        )


def apply_update(base: Mapping[str, torch.Tensor], package: bytes, expected_digest: str) -> StateDict:
    """The client side: decode the package, add it to the held weights, verify the digest."""
    weights = applied_update(base, package)
    check_update_digest(weights_digest(weights), expected_digest)
    return weights
