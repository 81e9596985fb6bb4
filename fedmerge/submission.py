"""One home for turning a submission into a task vector, and the rules every submission must meet.

Used by both servers: the intake's merge worker (:mod:`fedmerge.service.worker`, any format) and the
Flower round engine (:mod:`fedmerge.flower.server.judge`, task-vector packages and dense replies). Every
function raises an :class:`~fedmerge.errors.InvalidSubmission` subclass naming the tensor, module,
rank or hash at fault; none allocates in proportion to a size the submission declares before that
size was compared with the base.

Formats (τ = the task vector relative to the base θ₀, over the base's floating tensors):

- ``checkpoint`` (safetensors full weights: one file, or a Hugging Face model directory, sharded or
  not): τ = θ_ft − θ₀; every floating base tensor must be present with the base's shape (checked on
  the headers before any tensor is read).
- ``peft_tar`` (an uncompressed tar of a peft adapter directory): ΔW = s·B·A per adapted module.
- ``delta_package`` of kind ``task_vector``: the decoded tensors; of kind ``lora``: ΔW = (α/r)·B·A.

Base check (:func:`check_package_base`), one policy for both servers: a package must name the base
it was computed against — ``base_version_id`` and ``base_version_hash`` both set and both equal to the
server's base; an empty field is refused like a wrong one.

Completeness (:func:`complete_task_vector`, :func:`lora_package_task_vector`):

- a task vector holds at least one tensor, only floating tensors of the base, each with the base's
  shape. **Partial task vectors are allowed**: a base tensor the submission leaves out is read as
  *zero change* (τ = 0 there, so the expert keeps the base value of that tensor). Aggregators then
  treat it as any zero — a mean counts it (a FedAvg of one partial and one full client halves the
  full client's change of that tensor); TIES/MagMax ignore zeros when electing signs. The same rule
  holds in rounds and intake (the round engine folds a missing tensor as an empty sparse tensor).
- a LoRA submission holds both factors (A r×in, B out×r) of every module it adapts, with one rank r
  (= the declared ``lora_rank`` for packages), only factor names (a LoRA package carrying task-vector
  tensor names is refused), each module a 2-D floating base weight of shape out×in. Modules it does
  not adapt are zero change.

Magnitude bound (:func:`value_bound`): every value must satisfy |x| ≤ B, where B is what the
arithmetic can hold in fp32 without overflow::

    B = min( FP32_MAX / (4·W),  sqrt(FP32_MAX / (4·P)) )

with P the number of base entries (so ‖τ‖² ≤ P·B² ≤ FP32_MAX/4 stays finite, and so do the norms,
projections and sums the mergers form) and W the largest total weight an accumulator multiplies a
value by (Σ num-examples of a round; 1 for continual mergers). A value above B is refused with
:class:`ValueOutOfBounds` before anything is folded.
"""

from __future__ import annotations

import math
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from fedmerge.codec import DecodedPackage, DecodeLimits, decode_package, read_headers
from fedmerge.codec.validate import base_package_bytes
from fedmerge.delta.lora import (
    LORA_A,
    LORA_B,
    PEFT_PREFIX,
    LoraError,
    check_factor_ranks,
    lora_to_delta,
    pair_factors,
    peft_adapter_from_bytes,
)
from fedmerge.delta.rules import (  # the rules every format meets
    FP32_MAX,  # noqa: F401 (re-exported)
    IncompleteSubmission,
    NonFiniteMerge,  # noqa: F401 (re-exported)
    StaleOrInvalid,
    ValueOutOfBounds,  # noqa: F401 (re-exported)
    check_finite,  # noqa: F401 (re-exported)
    check_package_base,
    check_values,
    value_bound,
)
from fedmerge.delta.sparse import SparseTensor
from fedmerge.errors import InvalidSubmission

MAX_CONFIG_BYTES = 1 << 20
"""Largest ``adapter_config.json`` read from a peft archive."""
MAX_TAR_MEMBERS = 256
"""Most members a peft archive may list (a peft adapter directory holds a handful of files)."""


# ------------------------------------------------------------------------------------------ completeness


def floating_shapes(base: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Name → shape of the floating tensors of ``base`` (what a task vector may cover)."""
    return {n: tuple(t.shape) for n, t in base.items() if t.is_floating_point()}


def complete_task_vector(
    base: Mapping[str, torch.Tensor], partial: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """A task vector over every floating base tensor: ``partial`` where given, zeros (zero change)
    elsewhere. ``partial`` must hold at least one tensor, only floating base tensors, base shapes."""
    if not partial:
        raise IncompleteSubmission(
            f"{what} holds no tensors; a task vector must change at least one tensor of the base"
        )
    for name in sorted(partial):
        if name not in base or not base[name].is_floating_point():
            raise InvalidSubmission(
                f"{what}: tensor {name!r} is not a floating parameter of the base model; "
                "was it fine-tuned from another base?"
            )
        if tuple(partial[name].shape) != tuple(base[name].shape):
            raise InvalidSubmission(
                f"{what}: tensor {name!r} has shape {tuple(partial[name].shape)}, the base has "
                f"{tuple(base[name].shape)}; fine-tune from the server's base version"
            )
        if not partial[name].is_floating_point():
            raise InvalidSubmission(f"{what}: tensor {name!r} is {partial[name].dtype}, not floating")
    out: dict[str, torch.Tensor] = {}
    for name, weight in sorted(base.items()):
        if not weight.is_floating_point():
            continue
        t = partial.get(name)
        out[name] = torch.zeros(weight.shape, dtype=torch.float32) if t is None else t.to(torch.float32)
    return out


_complete = complete_task_vector  # the worker's former private name


# ------------------------------------------------------------------------------------------ checkpoint


def checkpoint_to_task_vector(
    path: Path, base: Mapping[str, torch.Tensor], *, max_abs: float | None = None
) -> dict[str, torch.Tensor]:
    """τ = θ_ft − θ₀ over the base's floating tensors. ``path`` is a safetensors file or a Hugging Face
    model directory (``model.safetensors`` or shards with their index, :mod:`fedmerge.delta.hf`). It must
    hold all of the base's floating tensors, floating, with the base's shapes — checked on the
    safetensors headers before any tensor is read; tensors the base lacks are ignored."""
    from fedmerge.delta.hf import HFCheckpoint, HFModelError

    shapes = floating_shapes(base)
    what = "HF model directory" if Path(path).is_dir() else "checkpoint"
    try:
        with HFCheckpoint(path) as ckpt:
            missing = sorted(set(shapes) - set(ckpt.tensors))
            if missing:
                raise IncompleteSubmission(
                    f"{what} lacks base tensor {missing[0]!r} ({len(missing)} missing); send the full "
                    "fine-tuned state dict, or a LoRA adapter / DeltaPackage for partial updates"
                )
            for n, shape in sorted(shapes.items()):
                info = ckpt.tensors[n]
                if not info.dtype.startswith(("F", "BF")):
                    raise InvalidSubmission(f"{what} tensor {n!r} is {info.dtype}, the base's is floating")
                if info.shape != shape:
                    raise InvalidSubmission(
                        f"{what} tensor {n!r} has shape {info.shape}, the base has {shape}"
                    )
            tau = {n: ckpt.get(n).to(torch.float32) - base[n].to(torch.float32) for n in sorted(shapes)}
    except HFModelError as exc:
        if what == "checkpoint":  # one file: the wording the hostile corpus and intake clients know
            raise InvalidSubmission(
                f"checkpoint is not a readable safetensors file ({exc}); send model.safetensors"
            ) from None
        raise InvalidSubmission(f"{what}: {exc}") from None
    except (OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, InvalidSubmission):
            raise
        raise InvalidSubmission(
            f"{what} is not a readable safetensors file ({exc}); send model.safetensors"
        ) from None
    check_values(tau, value_bound(shapes) if max_abs is None else max_abs, what)
    return complete_task_vector(base, tau, what)


# ------------------------------------------------------------------------------------------ peft


def read_peft_tar(path: Path, max_weights_bytes: int) -> tuple[bytes, bytes]:
    """(``adapter_config.json``, ``adapter_model.safetensors``) bytes of an uncompressed tar, read into
    memory and nowhere else. Refused before reading: sparse members (GNU/PAX sparse: a few bytes on
    the wire that expand to their declared size), more than :data:`MAX_TAR_MEMBERS` members, a config
    over :data:`MAX_CONFIG_BYTES` or weights over ``max_weights_bytes`` by declared size; each member
    is read for at most its declared size."""
    limits = {"adapter_config.json": MAX_CONFIG_BYTES, "adapter_model.safetensors": max_weights_bytes}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for count, member in enumerate(iter(tar.next, None), 1):
                if count > MAX_TAR_MEMBERS:
                    raise InvalidSubmission(
                        f"peft archive lists more than {MAX_TAR_MEMBERS} members; tar the adapter directory"
                    )
                name = Path(member.name).name
                if member.issparse():
                    raise InvalidSubmission(
                        f"peft archive member {member.name!r} is a sparse file (declares {member.size} "
                        "bytes); tar the adapter directory without --sparse"
                    )
                if name not in limits or not member.isfile():
                    continue
                if member.size > limits[name]:
                    raise InvalidSubmission(
                        f"peft archive member {member.name!r} declares {member.size} bytes, above the "
                        f"{limits[name]} an adapter of this base can need"
                    )
                src = tar.extractfile(member)
                if src is None:
                    continue
                with src:
                    found[name] = src.read(member.size)
    except tarfile.TarError as exc:
        raise InvalidSubmission(f"peft expert is not an uncompressed tar archive ({exc})") from None
    for wanted in limits:
        if wanted not in found:
            raise InvalidSubmission(f"peft archive has no {wanted}; tar the adapter directory")
    return found["adapter_config.json"], found["adapter_model.safetensors"]


def peft_tar_to_task_vector(
    path: Path, base: Mapping[str, torch.Tensor], *, max_abs: float | None = None
) -> dict[str, torch.Tensor]:
    """ΔW = s·B·A for every LoRA module of a tarred peft adapter directory; zero change elsewhere.
    Both factors of every module, one rank per module, no non-LoRA tensors (``modules_to_save``)."""
    shapes = floating_shapes(base)
    config, weights = read_peft_tar(path, base_package_bytes(shapes, factor=2))
    try:
        adapter = peft_adapter_from_bytes(config, weights, origin="peft adapter")
    except LoraError as exc:
        raise InvalidSubmission(f"peft adapter: {exc}") from None
    if adapter.extra:
        raise IncompleteSubmission(
            f"peft adapter: tensor {sorted(adapter.extra)[0]!r} is not a LoRA factor; only lora_A/lora_B "
            "weights are merged (drop modules_to_save, or send a checkpoint)"
        )
    if not adapter.modules:
        raise IncompleteSubmission("peft adapter holds no LoRA modules")
    for name, module in sorted(adapter.modules.items()):
        _check_lora_module(name, tuple(module.B.shape[:1]) + tuple(module.A.shape[1:]), shapes, adapter)
    bound = value_bound(shapes) if max_abs is None else max_abs
    factors = {f"{n}.A": m.A for n, m in adapter.modules.items()}
    factors.update({f"{n}.B": m.B for n, m in adapter.modules.items()})
    check_values({k: v.float() for k, v in factors.items()}, math.sqrt(bound), "peft adapter")
    delta = lora_to_delta(adapter)
    check_values(delta, bound, "peft adapter")
    return complete_task_vector(base, delta, "peft adapter")


def _check_lora_module(
    name: str, out_in: tuple[int, ...], shapes: Mapping[str, tuple[int, ...]], adapter: object
) -> None:
    base_shape = shapes.get(name)
    if base_shape is None or len(base_shape) != 2:
        raise InvalidSubmission(
            f"LoRA module for {name!r}: not a 2-D floating weight of the base model; was the adapter "
            "trained on another base?"
        )
    want = base_shape[::-1] if getattr(adapter, "fan_in_fan_out", False) else base_shape
    if out_in != tuple(want):
        raise InvalidSubmission(
            f"LoRA module for {name!r}: B·A is {out_in}, the base weight is {base_shape}; "
            "train the adapter on the server's base version"
        )


# ------------------------------------------------------------------------------------------ packages


def decode_task_vector_package(
    data: bytes,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    base_id: str,
    base_hash: str,
    limits: DecodeLimits = DecodeLimits(),  # noqa: B008 (frozen)
) -> DecodedPackage:
    """Decode a task-vector package against the base's ``shapes``: header, base and names first (no
    payload decoded), then the payloads. Partial packages are allowed (module docstring); use
    :func:`fill_missing` to complete them. Raises for another kind: rounds merge task vectors."""
    _, meta, _ = read_headers(data, limits.within_base(shapes))
    check_package_base(meta.base_version_id, meta.base_version_hash, base_id, base_hash)
    if meta.kind != "task_vector":
        raise StaleOrInvalid(f"package kind {meta.kind!r} where a task vector was expected")
    return decode_package(data, expected_shapes=shapes, limits=limits, allow_missing=True)


def fill_missing(
    tensors: Mapping[str, torch.Tensor | SparseTensor], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor | SparseTensor]:
    """``tensors`` plus an empty :class:`SparseTensor` (zero change, no allocation) for every base
    tensor left out."""
    out = dict(tensors)
    for name, shape in shapes.items():
        if name not in out:
            out[name] = SparseTensor(torch.zeros(0, dtype=torch.int64), torch.zeros(0), tuple(shape))
    return out


def lora_package_task_vector(
    data: bytes,
    base: Mapping[str, torch.Tensor],
    *,
    base_id: str,
    base_hash: str,
    limits: DecodeLimits = DecodeLimits(),  # noqa: B008 (frozen)
    max_abs: float | None = None,
) -> dict[str, torch.Tensor]:
    """ΔW = (α/r)·B·A per module of a LoRA package. The factor headers are checked against the base
    (pairs complete, rank = ``lora_rank``, B·A of the base weight's shape, no other tensor) before
    any payload is decoded."""
    shapes = floating_shapes(base)
    _, meta, headers = read_headers(data, limits.within_base(shapes, factor=2))
    check_package_base(meta.base_version_id, meta.base_version_hash, base_id, base_hash)
    if meta.kind != "lora":
        raise StaleOrInvalid(f"package kind {meta.kind!r} where a LoRA package was expected")
    if meta.lora_rank <= 0:
        raise InvalidSubmission("LoRA delta package declares lora_rank 0; set it in PackageMeta")
    declared = {h.name: h.shape for h in headers}
    if not declared:
        raise IncompleteSubmission("LoRA delta package holds no tensors; send lora_A and lora_B factors")
    pairs = pair_factors(declared)
    problems = sorted([(k, "") for k in pairs.others] + pairs.unpaired)
    if problems:
        name, partner = problems[0]
        if not partner:
            raise InvalidSubmission(
                f"LoRA delta package: tensor {name!r} is not a lora_A/lora_B factor; send task-vector "
                "tensors as a package of kind task_vector"
            )
        module = name.removesuffix(LORA_A).removesuffix(LORA_B)
        have, lack = ("lora_A", "lora_B") if name.endswith(LORA_A) else ("lora_B", "lora_A")
        raise IncompleteSubmission(
            f"LoRA delta package: module {module!r} has {have} but no {lack}; "
            "send both factors of every adapted module"
        )
    modules = {m: m.removeprefix(PEFT_PREFIX) + ".weight" for m in pairs.modules}
    for module, weight in sorted(modules.items()):
        a_shape, b_shape = declared[module + LORA_A], declared[module + LORA_B]
        try:
            check_factor_ranks(
                module, torch.empty(a_shape, device="meta"), torch.empty(b_shape, device="meta"),
                rank=meta.lora_rank,
            )  # fmt: skip
        except LoraError as exc:
            raise InvalidSubmission(f"LoRA delta package: {exc}") from None
        _check_lora_module(weight, (b_shape[0], a_shape[1]), shapes, None)
    decoded = decode_package(data, expected_shapes=declared, limits=limits)
    dense = {n: _dense(t) for n, t in decoded.tensors.items()}
    bound = value_bound(shapes) if max_abs is None else max_abs
    check_values(dense, math.sqrt(bound), "LoRA delta package")
    scale = meta.lora_alpha / meta.lora_rank
    delta = {w: scale * (dense[m + LORA_B] @ dense[m + LORA_A]) for m, w in sorted(modules.items())}
    check_values(delta, bound, "LoRA delta package")
    return complete_task_vector(base, delta, "LoRA delta package")


def _dense(t: torch.Tensor | SparseTensor) -> torch.Tensor:
    return t.to_dense(torch.float32) if isinstance(t, SparseTensor) else t.to(torch.float32)


def package_to_task_vector(
    path: Path,
    base: Mapping[str, torch.Tensor],
    max_bytes: int,
    *,
    base_id: str,
    base_hash: str,
    max_abs: float | None = None,
) -> dict[str, torch.Tensor]:
    """Decode a DeltaPackage made against base ``base_id``/``base_hash`` (see :func:`check_package_base`)
    with the base's shapes and base-derived limits; LoRA factors become ΔW = (α/r)·B·A."""
    data = path.read_bytes()
    limits = DecodeLimits(max_package_bytes=min(max(max_bytes, 1), (1 << 31) - 1))
    _, meta, _ = read_headers(data, limits.within_base(floating_shapes(base), factor=2))
    if meta.kind == "lora":
        return lora_package_task_vector(
            data, base, base_id=base_id, base_hash=base_hash, limits=limits, max_abs=max_abs
        )
    shapes = floating_shapes(base)
    decoded = decode_task_vector_package(data, shapes, base_id=base_id, base_hash=base_hash, limits=limits)
    check_values(decoded.tensors, value_bound(shapes) if max_abs is None else max_abs, "delta package")
    return complete_task_vector(base, {n: _dense(t) for n, t in decoded.tensors.items()}, "delta package")


# ------------------------------------------------------------------------------------------ dispatch


class _Expert(Protocol):
    @property
    def format(self) -> str: ...


class _Base(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def content_hash(self) -> str: ...


def submission_to_task_vector(
    fmt: str,
    path: Path,
    weights: Mapping[str, torch.Tensor],
    *,
    base_id: str,
    base_hash: str,
    max_bytes: int,
    max_abs: float | None = None,
) -> dict[str, torch.Tensor]:
    """τ of one submission of format ``fmt`` (``checkpoint``, ``peft_tar``, ``delta_package``)
    relative to the base ``base_id`` whose floating tensors are ``weights``."""
    if fmt == "checkpoint":
        return checkpoint_to_task_vector(path, weights, max_abs=max_abs)
    if fmt == "peft_tar":
        return peft_tar_to_task_vector(path, weights, max_abs=max_abs)
    if fmt == "delta_package":
        return package_to_task_vector(
            path, weights, max_bytes, base_id=base_id, base_hash=base_hash, max_abs=max_abs
        )
    raise InvalidSubmission(f"unknown submission format {fmt!r}; use checkpoint, peft_tar or delta_package")


def expert_task_vector(
    sub: _Expert, path: Path, base: _Base, weights: Mapping[str, torch.Tensor], max_bytes: int
) -> dict[str, torch.Tensor]:
    """τ of one spooled expert relative to ``base`` (whose floating tensors are ``weights``)."""
    return submission_to_task_vector(
        sub.format, path, weights, base_id=base.id, base_hash=base.content_hash, max_bytes=max_bytes
    )
