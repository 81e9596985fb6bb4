"""The data of the hostile-input corpus: the entry points, the classes of bad input, a valid
submission and an attack built from it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from fedmerge.codec import CodecConfig, PackageMeta, encode_package
from fedmerge.errors import ConfigError, FedMergeError

if TYPE_CHECKING:
    pass


EntryPoint = Literal["flower", "intake"]
ENTRY_POINTS: tuple[EntryPoint, ...] = ("flower", "intake")

CLASSES: dict[str, str] = {
    "truncated": "bytes cut short: a package or a stream that ends early",
    "random": "random bytes where a package, checkpoint or archive is expected",
    "magic/version": "wrong format version or wrong container (stype, safetensors header, format enum)",
    "nan/inf": "NaN or infinite values or block scales",
    "huge sizes": "declared sizes far above the limits: shape, nnz, name, header length, weight",
    "index range": "sparse indices outside the tensor",
    "duplicate indices": "the same index twice, or indices out of order",
    "shapes": "tensor shapes that differ from the base version's",
    "names": "unknown, missing or duplicated tensor names",
    "checksum": "payload bytes changed after the checksum was computed",
    "stale": "computed against another base version or for another round",
    "replay": "a submission sent again, identical",
    "oversized": "more bytes than the limits allow (declared, streamed or in one message)",
    "slow-loris": "a client that starts and then stalls",
    "unauthenticated": "a call without credentials",
    "wrong auth": "a wrong token, or a client claiming another client's identity",
    "framing": "stream framing: header not first, two headers, unknown format, bad hash fields, offsets",
    "crash": "a client that fails and replies with an error",
    "magnitude": "finite values above what the merge arithmetic can hold (e.g. all 3e38)",
    "metrics": "reply metrics of any type and value: num-examples NaN, inf, negative, fractional, missing",
    "completeness": "a submission that does not cover what its kind requires (no tensor, half a LoRA pair)",
    "merge failure": "an acknowledged expert the worker cannot convert (malformed peft config or weights)",
    "expansion": "a few hundred bytes that declare gigabytes (one COO entry or a random-k seed over "
    "shape [2^28], a sparse tar member declaring 1 GiB): refused on the declared size, nothing expanded",
}

KIB = 1 << 10
MIB = 1 << 20


class HostileRunError(FedMergeError, RuntimeError):
    """A hostile-input run could not be set up (server did not start, simulation failed...)."""


# ------------------------------------------------------------------------------------------ the data


@dataclass(frozen=True)
class Valid:
    """A valid submission for an entry point's current base, from which attacks are built.

    ``base``: the floating tensors of the base version; ``delta``: a valid task vector; ``meta``: its
    package metadata; ``codec``: how it is encoded; ``peer_data``: the package an honest peer sent
    (replays copy it) and ``peer_client_id`` the id it claims (impostors copy it);
    ``other_version``: a version id that is not the current base;
    ``limit_bytes``: the entry point's size limit for one submission.
    """

    base: Mapping[str, torch.Tensor]
    delta: Mapping[str, torch.Tensor]
    meta: PackageMeta
    codec: CodecConfig
    peer_data: bytes
    peer_client_id: str
    other_version: str
    limit_bytes: int

    def encode(
        self,
        *,
        delta: Mapping[str, torch.Tensor] | None = None,
        meta: PackageMeta | None = None,
        codec: CodecConfig | None = None,
    ) -> bytes:
        """The package of ``delta``/``meta``/``codec`` (each defaults to this submission's)."""
        return encode_package(
            dict(delta if delta is not None else self.delta),
            codec or self.codec,
            meta=meta or self.meta,
        ).data

    @property
    def data(self) -> bytes:
        return self.encode()

    def checkpoint(self, delta: Mapping[str, torch.Tensor] | None = None) -> bytes:
        """Full fine-tuned weights θ = θ₀ + τ as a safetensors file (the intake's ``checkpoint``)."""
        from safetensors.torch import save

        tau = delta if delta is not None else self.delta
        return save(
            {
                k: (v.reshape(tau[k].shape) + tau[k]).contiguous() if k in tau else v
                for k, v in self.base.items()
            }
        )


Reply = Literal["package", "dense", "error", "empty", "stype"]
Auth = Literal["valid", "none", "wrong"]
Framing = Literal["ok", "data-first", "second-header"]


@dataclass(frozen=True)
class Attack:
    """What a hostile client sends; fields an entry point does not use are ignored by it.

    Both: ``payload`` (package or expert bytes), ``stall_s`` (Flower: the reply comes this late;
    intake: the stream stalls after its first data chunk). Flower: ``reply`` (a package, full weights
    ``dense``, an ``error`` reply, an ``empty`` one, or the package under a wrong ``stype``).
    Intake: ``fmt``, ``auth``, ``header`` (SubmitHeader fields overriding the honest ones), whether
    to ``declare_sha``, ``chunk_size``, ``reorder`` (swap the first two chunks), ``framing``,
    ``bulk_offset`` (a BulkUpload at this wrong offset instead), ``streams`` (parallel stalls).
    """

    payload: bytes | None = None
    stall_s: float = 0.0
    reply: Reply = "package"
    dense: Mapping[str, np.ndarray] | None = None
    error: str = ""
    num_examples: int = 100
    metrics: Mapping[str, Any] | None = None  # Flower: the reply's whole MetricRecord, when given
    dense_npy: Mapping[str, tuple[list[int], bytes]] | None = None  # Flower: raw (shape, .npy bytes)
    fmt: str = "delta_package"
    auth: Auth = "valid"
    header: Mapping[str, Any] = field(default_factory=dict)
    declare_sha: bool = True
    chunk_size: int = 64 * KIB
    reorder: bool = False
    framing: Framing = "ok"
    bulk_offset: int | None = None
    streams: int = 1


@dataclass(frozen=True)
class HostileCase:
    """One bad input: ``expect[entry]`` is a regular expression the entry point's error must match;
    ``gaps[entry]`` names a defence that entry point lacks (the case then shows it)."""

    name: str
    klass: str
    description: str
    build: Callable[[Valid], Attack]
    expect: Mapping[EntryPoint, str]
    gaps: Mapping[EntryPoint, str] = field(default_factory=dict)

    @property
    def entry_points(self) -> tuple[EntryPoint, ...]:
        return tuple(e for e in ENTRY_POINTS if e in self.expect)

    def __post_init__(self) -> None:
        if self.klass not in CLASSES:
            raise ConfigError(f"case {self.name!r}: unknown class {self.klass!r}; add it to CLASSES")
