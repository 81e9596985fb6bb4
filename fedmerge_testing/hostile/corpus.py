"""The corpus: every hostile case, the entry points it applies to and what each is expected to answer."""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import replace
from typing import TYPE_CHECKING

from fedmerge.errors import ConfigError

if TYPE_CHECKING:
    pass
from fedmerge_testing.hostile.data import KIB, MIB, Attack, EntryPoint, HostileCase
from fedmerge_testing.hostile.mutations import (
    _FP32,
    _ONE_COO,
    _PEFT_CONFIG,
    _RANDOMK,
    _coo_edit,
    _declaring,
    _dense_weights,
    _dense_with_metrics,
    _drop_from_checkpoint,
    _filled,
    _flip_value_byte,
    _garbled_header_checkpoint,
    _huge_header_checkpoint,
    _huge_npy,
    _lora_package,
    _nan_delta,
    _peft_tar,
    _peft_tar_with_sparse_weights,
    _renamed,
    _reshape,
    _scale_inf,
    _set,
    _transposed,
    _values_nan,
    mutate,
    seeded_bytes,
)

# ------------------------------------------------------------------------------------------ the corpus

_MALFORMED = r"MalformedPackage|PayloadSizeMismatch|UnsupportedFormatVersion|bytes are not a fedmerge"
_UNAUTH = r"UNAUTHENTICATED"
_QUOTA = r"(FAILED_PRECONDITION|RESOURCE_EXHAUSTED)"  # a limit no retry can satisfy (or, older: quota)


_ACK_REFUSED = r"then (rejected|failed): "  # acknowledged, then set aside by the merge worker


CASES: tuple[HostileCase, ...] = (
    # -- truncated
    HostileCase(
        "truncated-half",
        "truncated",
        "the first half of a valid package",
        lambda v: Attack(v.data[: len(v.data) // 2]),
        {"flower": _MALFORMED, "intake": r"bytes are not a fedmerge\.v1\.DeltaPackage|payload is \d+ bytes"},
    ),
    HostileCase(
        "truncated-last-byte",
        "truncated",
        "a valid package without its last byte",
        lambda v: Attack(v.data[:-1]),
        {"flower": _MALFORMED + "|ChecksumMismatch", "intake": r"DeltaPackage|checksum|payload"},
    ),
    HostileCase(
        "truncated-stream",
        "truncated",
        "the header declares 2× the bytes the stream carries",
        lambda v: Attack(v.data, header={"total_size": 2 * len(v.data)}),
        {"intake": r"INVALID_ARGUMENT: received \d+ bytes but the header declared \d+"},
    ),
    HostileCase(
        "empty-payload",
        "truncated",
        "zero bytes",
        lambda v: Attack(b""),
        {
            "flower": r"UnsupportedFormatVersion: format_version 0",
            "intake": r"INVALID_ARGUMENT: .*total_size > 0",
        },
    ),
    # -- random
    HostileCase(
        "random-bytes",
        "random",
        "4 KiB of random bytes as a delta package",
        lambda v: Attack(seeded_bytes("random-bytes", 4 * KIB)),
        {"flower": _MALFORMED, "intake": r"bytes are not a fedmerge\.v1\.DeltaPackage|format_version"},
    ),
    HostileCase(
        "random-checkpoint",
        "random",
        "4 KiB of random bytes as a safetensors checkpoint",
        lambda v: Attack(seeded_bytes("random-checkpoint", 4 * KIB), fmt="checkpoint"),
        {"intake": r"checkpoint is not a readable safetensors file"},
    ),
    HostileCase(
        "random-peft-tar",
        "random",
        "4 KiB of random bytes as a peft adapter archive",
        lambda v: Attack(seeded_bytes("random-peft-tar", 4 * KIB), fmt="peft_tar"),
        {"intake": r"not an uncompressed tar archive|peft archive has no"},
    ),
    # -- magic / version
    HostileCase(
        "wrong-format-version",
        "magic/version",
        "format_version = 99, re-signed",
        lambda v: Attack(mutate(v.data, lambda p: _set(p, format_version=99))),
        {
            "flower": r"UnsupportedFormatVersion: format_version 99",
            "intake": r"format_version 99 is not supported",
        },
    ),
    HostileCase(
        "wrong-stype",
        "magic/version",
        "the package in an Array of stype 'fedmerge-delta-v0'",
        lambda v: Attack(v.data, reply="stype"),
        {"flower": r"MissingPackage: .*stype 'fedmerge-delta-v0'"},
    ),
    HostileCase(
        "package-as-checkpoint",
        "magic/version",
        "a valid delta package declared as a checkpoint",
        lambda v: Attack(v.data, fmt="checkpoint"),
        {"intake": r"checkpoint is not a readable safetensors file"},
    ),
    HostileCase(
        "garbled-safetensors-header",
        "magic/version",
        "a checkpoint whose JSON header is random bytes",
        lambda v: Attack(_garbled_header_checkpoint(v), fmt="checkpoint"),
        {"intake": r"checkpoint is not a readable safetensors file"},
    ),
    HostileCase(
        "unknown-format",
        "framing",
        "SubmitHeader.format = 99",
        lambda v: Attack(v.data, header={"format": 99}),
        {"intake": r"INVALID_ARGUMENT: header\.format 99 is not a known ExpertFormat"},
    ),
    # -- NaN / Inf
    HostileCase(
        "nan-value",
        "nan/inf",
        "an fp32 value set to NaN, re-signed",
        lambda v: Attack(mutate(v.encode(codec=_FP32), _values_nan)),
        {"flower": r"NonFiniteValues: .*nan", "intake": r"value 0 of \d+ is nan"},
    ),
    HostileCase(
        "inf-block-scale",
        "nan/inf",
        "an int8 block scale set to +inf, re-signed",
        lambda v: Attack(mutate(v.encode(codec=replace(v.codec, values="int8")), _scale_inf)),
        {"flower": r"NonFiniteValues: .*block scale", "intake": r"block scale is NaN or infinite"},
    ),
    HostileCase(
        "nan-checkpoint",
        "nan/inf",
        "full weights with one NaN",
        lambda v: Attack(v.checkpoint(_nan_delta(v)), fmt="checkpoint"),
        {"intake": r"NaN or inf"},
    ),
    HostileCase(
        "nan-dense-reply",
        "nan/inf",
        "a plain Flower reply of full weights with one NaN",
        lambda v: Attack(reply="dense", dense=_dense_weights(v, _nan_delta(v))),
        {"flower": r"PackageError: .*NaN or infinite"},
    ),
    # -- huge declared sizes
    HostileCase(
        "huge-shape",
        "huge sizes",
        "a tensor declaring shape (2^20, 2^20), re-signed",
        lambda v: Attack(mutate(v.data, _reshape)),
        {
            "flower": r"DeclaredSizeTooLarge: .*refused before allocation",
            "intake": r"refused before allocation",
        },
    ),
    HostileCase(
        "huge-nnz",
        "huge sizes",
        "nnz = 2^40 on a small tensor, re-signed",
        lambda v: Attack(mutate(v.data, lambda p: _set(p.tensors[0], nnz=1 << 40))),
        {
            "flower": r"MalformedPackage: .*nnz = 1099511627776 is impossible",
            "intake": r"nnz = 1099511627776",
        },
    ),
    HostileCase(
        "huge-name",
        "huge sizes",
        "a tensor name of 5000 bytes, re-signed",
        lambda v: Attack(mutate(v.data, lambda p: _set(p.tensors[0], name="n" * 5000))),
        {"flower": r"DeclaredSizeTooLarge: .*max_name_bytes", "intake": r"max_name_bytes"},
    ),
    HostileCase(
        "huge-num-examples",
        "huge sizes",
        "num_examples = 10^15 (to dominate the weighted merge)",
        lambda v: Attack(v.encode(meta=replace(v.meta, num_examples=10**15))),
        {"flower": r"StaleOrInvalid: num-examples=1000000000000000 .* is outside"},
    ),
    HostileCase(
        "huge-safetensors-header",
        "huge sizes",
        "a checkpoint declaring a 2^62-byte header",
        lambda v: Attack(_huge_header_checkpoint(v), fmt="checkpoint"),
        {"intake": r"checkpoint is not a readable safetensors file"},
    ),
    # -- indices
    HostileCase(
        "index-out-of-range",
        "index range",
        "the last coo index set to numel, re-signed",
        lambda v: Attack(_coo_edit(v, lambda idx, n: idx.__setitem__(-1, n))),
        {
            "flower": r"InvalidIndices: .*an index is outside \[0, \d+\)",
            "intake": r"an index is outside \[0, \d+\)",
        },
    ),
    HostileCase(
        "index-negative",
        "index range",
        "the first coo index set to -1, re-signed",
        lambda v: Attack(_coo_edit(v, lambda idx, n: idx.__setitem__(0, -1))),
        {
            "flower": r"InvalidIndices: .*an index is outside \[0, \d+\) \(first -1",
            "intake": r"an index is outside \[0, \d+\) \(first -1",
        },
    ),
    HostileCase(
        "duplicate-index",
        "duplicate indices",
        "coo index 1 equal to index 0, re-signed",
        lambda v: Attack(_coo_edit(v, lambda idx, n: idx.__setitem__(1, idx[0]))),
        {"flower": r"InvalidIndices: .*(increasing|duplicate)", "intake": r"increasing|duplicate"},
    ),
    HostileCase(
        "unsorted-indices",
        "duplicate indices",
        "two coo indices swapped, re-signed",
        lambda v: Attack(_coo_edit(v, lambda idx, n: idx.__setitem__(slice(0, 2), idx[1::-1].copy()))),
        {"flower": r"InvalidIndices: .*increasing", "intake": r"increasing"},
    ),
    # -- shapes and names
    HostileCase(
        "wrong-shape",
        "shapes",
        "a 2-D tensor sent transposed",
        lambda v: Attack(v.encode(delta=_transposed(v))),
        {
            "flower": r"TensorShapeMismatch: .*declares shape",
            "intake": r"tensor '[^']+': declares shape \(\d+, \d+\) but the base version has \(\d+, \d+\)",
        },
    ),
    HostileCase(
        "wrong-shape-checkpoint",
        "shapes",
        "full weights with one tensor transposed",
        lambda v: Attack(v.checkpoint(_transposed(v)), fmt="checkpoint"),
        {"intake": r"checkpoint tensor .* has shape"},
    ),
    HostileCase(
        "wrong-shape-dense-reply",
        "shapes",
        "a plain Flower reply of full weights, one tensor transposed",
        lambda v: Attack(reply="dense", dense=_dense_weights(v, _transposed(v))),
        {"flower": r"TensorShapeMismatch: .*in the reply"},
    ),
    HostileCase(
        "unknown-name",
        "names",
        "a tensor renamed '<name>.evil'",
        lambda v: Attack(v.encode(delta=_renamed(v))),
        {
            "flower": r"TensorNameMismatch: .*not a tensor of the base",
            "intake": r"tensor '[^']+\.evil': is not a tensor of the base version",
        },
    ),
    HostileCase(
        "no-tensors",
        "completeness",
        "a task-vector package with every tensor left out, re-signed (partial deltas are zero change)",
        lambda v: Attack(mutate(v.data, lambda p: p.ClearField("tensors"))),
        {"flower": r"TensorNameMismatch: package holds no tensors", "intake": r"holds no tensors"},
    ),
    HostileCase(
        "duplicate-name",
        "names",
        "the second tensor renamed as the first, re-signed",
        lambda v: Attack(mutate(v.data, lambda p: _set(p.tensors[1], name=p.tensors[0].name))),
        {"flower": r"TensorNameMismatch: .*appears twice", "intake": r"appears twice"},
    ),
    HostileCase(
        "checkpoint-missing-tensor",
        "names",
        "full weights lacking one tensor",
        lambda v: Attack(_drop_from_checkpoint(v), fmt="checkpoint"),
        {"intake": r"checkpoint lacks base tensor"},
    ),
    # -- checksums
    HostileCase(
        "tampered-values",
        "checksum",
        "one value byte flipped after signing",
        lambda v: Attack(mutate(v.data, _flip_value_byte, sign=False)),
        # a tensor that carries its checksum names itself; a small one's is folded into the package's
        {"flower": r"ChecksumMismatch", "intake": r"(SHA-256 of the tensor|package checksum) does not match"},
    ),
    HostileCase(
        "tampered-header",
        "checksum",
        "format fields changed, package checksum left as it was",
        lambda v: Attack(mutate(v.data, lambda p: _set(p, round=p.round + 1), sign=False)),
        {"flower": r"ChecksumMismatch: package checksum", "intake": r"package checksum does not match"},
    ),
    HostileCase(
        "sha-mismatch",
        "checksum",
        "SubmitHeader.sha256 of other bytes",
        lambda v: Attack(v.data, header={"sha256": hashlib.sha256(b"other").hexdigest()}),
        {"intake": r"INVALID_ARGUMENT: payload hashes to .* but the header declared"},
    ),
    # -- stale
    HostileCase(
        "stale-base",
        "stale",
        "a package computed against another base version (id and hash)",
        lambda v: Attack(
            v.encode(meta=replace(v.meta, base_version_id=v.other_version, base_version_hash="0" * 64))
        ),
        {
            "flower": r"StaleOrInvalid: stale delta package: computed against base .*expected hash",
            "intake": r"stale delta package: computed against base .* this server merges onto base",
        },
    ),
    HostileCase(
        "stale-base-header",
        "stale",
        "SubmitHeader.base_version names a version that is not the base",
        lambda v: Attack(v.data, header={"base_version": v.other_version}),
        {"intake": r"expert was fine-tuned from|no committed version"},
    ),
    HostileCase(
        "unknown-base-header",
        "stale",
        "SubmitHeader.base_version = 'v999999'",
        lambda v: Attack(v.data, header={"base_version": "v999999"}),
        {"intake": r"no committed version 'v999999'"},
    ),
    HostileCase(
        "wrong-round",
        "stale",
        "a package for round + 7",
        lambda v: Attack(v.encode(meta=replace(v.meta, round=v.meta.round + 7))),
        {"flower": r"StaleOrInvalid: stale: package is for round"},
    ),
    HostileCase(
        "lora-kind",
        "stale",
        "a package of kind 'lora' where a task vector is expected",
        lambda v: Attack(v.encode(meta=replace(v.meta, kind="lora", lora_rank=4, lora_alpha=8.0))),
        {"flower": r"StaleOrInvalid: package kind 'lora'"},
    ),
    # -- replay
    HostileCase(
        "replay",
        "replay",
        "the exact bytes an honest client already submitted",
        lambda v: Attack(v.peer_data),
        {"flower": r"StaleOrInvalid: duplicate", "intake": r"duplicate of s-"},
    ),
    # -- oversized
    HostileCase(
        "oversized-package",
        "oversized",
        "a valid package padded past the size limit",
        lambda v: Attack(v.data + bytes(v.limit_bytes + 1 - len(v.data))),
        {
            "flower": r"StaleOrInvalid: package of \d+ bytes exceeds max-package-bytes",
            "intake": _QUOTA + r": expert of \d+ bytes exceeds the per-submission limit",
        },
    ),
    HostileCase(
        "declared-too-large",
        "oversized",
        "SubmitHeader.total_size = 2^40",
        lambda v: Attack(v.data, header={"total_size": 1 << 40}),
        {"intake": _QUOTA + r": expert of 1099511627776 bytes exceeds"},
    ),
    HostileCase(
        "more-than-declared",
        "oversized",
        "the stream carries 2× the declared total_size",
        lambda v: Attack(v.data + v.data, header={"total_size": len(v.data)}, declare_sha=False),
        {"intake": r"INVALID_ARGUMENT: received more than the declared total_size"},
    ),
    HostileCase(
        "message-too-large",
        "oversized",
        "one 3 MiB data message (the server takes 2 MiB messages)",
        lambda v: Attack(
            seeded_bytes("big", 3 * MIB),
            header={"total_size": v.limit_bytes},
            declare_sha=False,
            chunk_size=3 * MIB,
        ),
        {"intake": r"RESOURCE_EXHAUSTED|larger than max"},
    ),
    # -- slow-loris
    HostileCase(
        "slow-loris",
        "slow-loris",
        "one reply/stream that starts, then stalls",
        lambda v: Attack(v.data, stall_s=600.0),
        {
            "flower": r"timeout: no reply within round-deadline-s|expired due to its TTL",
            "intake": r"dropped by the server: DEADLINE_EXCEEDED: .*--stream-idle-timeout-s",
        },
    ),
    HostileCase(
        "slow-loris-pool",
        "slow-loris",
        "as many stalled streams as the server has handler threads",
        lambda v: Attack(v.data, stall_s=600.0, streams=-1),
        {"intake": r"dropped by the server: .*; still serving"},
    ),
    # -- authentication
    HostileCase(
        "no-token",
        "unauthenticated",
        "SubmitExpert without an authorization header",
        lambda v: Attack(v.data, auth="none"),
        {"intake": _UNAUTH + r": missing 'authorization: Bearer <token>'"},
    ),
    HostileCase(
        "wrong-token",
        "wrong auth",
        "SubmitExpert with an unknown bearer token",
        lambda v: Attack(v.data, auth="wrong"),
        {"intake": _UNAUTH + r": unknown bearer token"},
    ),
    # -- framing
    HostileCase(
        "data-first",
        "framing",
        "the first SubmitChunk carries data, not the header",
        lambda v: Attack(v.data, framing="data-first"),
        {"intake": r"INVALID_ARGUMENT: the first SubmitChunk must carry the header"},
    ),
    HostileCase(
        "second-header",
        "framing",
        "a second header after the first data chunk",
        lambda v: Attack(v.data, framing="second-header"),
        {"intake": r"INVALID_ARGUMENT: only the first SubmitChunk may carry a header"},
    ),
    HostileCase(
        "malformed-sha-field",
        "framing",
        "SubmitHeader.sha256 = 'not-a-sha'",
        lambda v: Attack(v.data, header={"sha256": "not-a-sha"}),
        {"intake": r"INVALID_ARGUMENT: 'not-a-sha' is not a lowercase sha256"},
    ),
    HostileCase(
        "chunks-reordered",
        "framing",
        "the first two 64-byte chunks swapped (sha256 declared)",
        lambda v: Attack(v.data, chunk_size=64, reorder=True),
        {"intake": r"INVALID_ARGUMENT: payload hashes to"},
    ),
    HostileCase(
        "chunks-reordered-unsigned",
        "framing",
        "the first two 64-byte chunks swapped, no sha256 declared",
        lambda v: Attack(v.data, chunk_size=64, reorder=True, declare_sha=False),
        {"intake": r"then rejected: .*(DeltaPackage|checksum|payload|indices|nnz)"},
    ),
    HostileCase(
        "bulk-wrong-offset",
        "framing",
        "BulkUpload.Upload starting at offset 7 instead of 0",
        lambda v: Attack(v.data, bulk_offset=7),
        {"intake": r"INVALID_ARGUMENT: .*chunk at offset 7, expected 0"},
    ),
    HostileCase(
        "bulk-unknown-object",
        "framing",
        "SubmitHeader.bulk_object naming an object never uploaded",
        lambda v: Attack(None, header={"bulk_object": hashlib.sha256(b"never uploaded").hexdigest()}),
        {"intake": r"INVALID_ARGUMENT: bulk object .* is not complete on this server"},
    ),
    # -- magnitude, metrics, completeness (Flower reply path and shared conversion)
    HostileCase(
        "huge-values",
        "magnitude",
        "a task-vector package whose values are all 3e38 (finite), num_examples 10^6",
        lambda v: Attack(v.encode(delta=_filled(v, 3e38), meta=replace(v.meta, num_examples=10**6))),
        {"flower": r"ValueOutOfBounds: .*above the bound", "intake": r"above the bound"},
    ),
    HostileCase(
        "huge-values-dense",
        "magnitude",
        "a plain Flower reply of full weights θ₀ + 3e38",
        lambda v: Attack(reply="dense", dense=_dense_weights(v, _filled(v, 3e38))),
        {"flower": r"ValueOutOfBounds: .*above the bound"},
    ),
    *(
        HostileCase(
            f"dense-num-examples-{label}",
            "metrics",
            f"a plain Flower reply of valid full weights with MetricRecord num-examples = {label}",
            functools.partial(_dense_with_metrics, metrics=m),
            {"flower": r"StaleOrInvalid: (dense reply has no 'num-examples'|num-examples)"},
        )
        for label, m in (
            ("nan", {"num-examples": math.nan}),
            ("inf", {"num-examples": math.inf}),
            ("negative", {"num-examples": -5}),
            ("fractional", {"num-examples": 2.5}),
            ("list", {"num-examples": [1.0, 2.0]}),
            ("missing", {"loss": 0.1}),
        )
    ),
    HostileCase(
        "npy-huge-header",
        "huge sizes",
        "a plain Flower reply whose .npy header declares shape (10**11,) over 16 bytes of data",
        lambda v: Attack(reply="dense", dense=_dense_weights(v, v.delta), dense_npy=_huge_npy(v)),
        {"flower": r"TensorShapeMismatch: .*\(100000000000,\) in the reply"},
    ),
    HostileCase(
        "lora-b-only",
        "completeness",
        "a LoRA package with only lora_B factors",
        lambda v: Attack(_lora_package(v, drop="lora_A")),
        {"flower": r"StaleOrInvalid: package kind 'lora'", "intake": r"has lora_B but no lora_A"},
    ),
    HostileCase(
        "lora-task-vector-names",
        "completeness",
        "a LoRA package carrying task-vector tensor names",
        lambda v: Attack(v.encode(meta=replace(v.meta, kind="lora", lora_rank=2, lora_alpha=4.0))),
        {"flower": r"StaleOrInvalid: package kind 'lora'", "intake": r"is not a lora_A/lora_B factor"},
    ),
    HostileCase(
        "lora-rank-mismatch",
        "shapes",
        "a LoRA package whose lora_A has rank 3 and lora_B rank 2",
        lambda v: Attack(_lora_package(v, rank_a=3)),
        {
            "flower": r"StaleOrInvalid: package kind 'lora'",
            "intake": r"module .*lora_A .* has rank 3 but lora_B .* has rank 2",
        },
    ),
    # -- intake merge worker: acknowledged experts it cannot convert are set aside, never wedge it
    HostileCase(
        "peft-config-empty-object",
        "merge failure",
        "a peft adapter tar whose adapter_config.json is {}",
        lambda v: Attack(_peft_tar(b"{}"), fmt="peft_tar"),
        {"intake": _ACK_REFUSED + r".*adapter_config\.json"},
    ),
    HostileCase(
        "peft-config-json-list",
        "merge failure",
        "a peft adapter tar whose adapter_config.json is a JSON list",
        lambda v: Attack(_peft_tar(b"[" + _PEFT_CONFIG + b"]"), fmt="peft_tar"),
        {"intake": _ACK_REFUSED + r".*adapter_config\.json"},
    ),
    HostileCase(
        "peft-lora-alpha-object",
        "merge failure",
        "a peft adapter tar whose adapter_config.json has lora_alpha: {}",
        lambda v: Attack(
            _peft_tar(_PEFT_CONFIG.replace(b'"lora_alpha": 4', b'"lora_alpha": {}')), fmt="peft_tar"
        ),
        {"intake": _ACK_REFUSED + r".*lora_alpha"},
    ),
    HostileCase(
        "peft-weights-not-safetensors",
        "merge failure",
        "a peft adapter tar whose adapter_model.safetensors is not a safetensors file",
        lambda v: Attack(_peft_tar(_PEFT_CONFIG, seeded_bytes("peft-weights", 256)), fmt="peft_tar"),
        {"intake": _ACK_REFUSED + r".*not a safetensors file"},
    ),
    # -- expansion: tiny payloads that declare gigabytes
    HostileCase(
        "coo-one-entry-2^28",
        "expansion",
        "one COO entry in a tensor declaring shape [2^28] (~200 bytes; 1 GiB if expanded), re-signed",
        lambda v: Attack(_declaring(v, _ONE_COO)),
        {
            "flower": r"DeclaredSizeTooLarge: .*\(268435456,\).*refused before allocation",
            "intake": r"declares shape \(268435456,\).*refused before allocation",
        },
    ),
    HostileCase(
        "seeded-randomk-2^28",
        "expansion",
        "a random-k (seeded indices) tensor declaring shape [2^28] (~200 bytes), re-signed",
        lambda v: Attack(_declaring(v, _RANDOMK)),
        {
            "flower": r"DeclaredSizeTooLarge: .*\(268435456,\).*refused before allocation",
            "intake": r"declares shape \(268435456,\).*refused before allocation",
        },
    ),
    HostileCase(
        "peft-sparse-member-1GiB",
        "expansion",
        "a peft tar whose adapter_model.safetensors is a GNU sparse member declaring 1 GiB (3 KiB sent)",
        lambda v: Attack(_peft_tar_with_sparse_weights(1 << 30), fmt="peft_tar"),
        {"intake": _ACK_REFUSED + r".*is a sparse file \(declares 1073741824 bytes\)"},
    ),
    HostileCase(
        "bulk-sha-mismatch",
        "checksum",
        "SubmitHeader.bulk_object with a SubmitHeader.sha256 of other bytes",
        lambda v: Attack(
            None,
            header={
                "bulk_object": hashlib.sha256(v.data).hexdigest(),
                "sha256": hashlib.sha256(b"other").hexdigest(),
            },
        ),
        {"intake": r"INVALID_ARGUMENT: header\.sha256 [0-9a-f]{64} does not match the bulk object's hash"},
    ),
    # -- Flower reply shapes
    HostileCase(
        "client-error",
        "crash",
        "the ClientApp raises during training",
        lambda v: Attack(reply="error", error="hostile client crashed on purpose"),
        {"flower": r"client failed \(code \d+\): .*hostile client crashed on purpose"},
    ),
    HostileCase(
        "no-package",
        "truncated",
        "a reply with metrics but neither a package nor weights",
        lambda v: Attack(reply="empty"),
        {"flower": r"StaleOrInvalid: reply carries neither a fedmerge package"},
    ),
)


def case(name: str) -> HostileCase:
    """The case called ``name``."""
    for c in CASES:
        if c.name == name:
            return c
    raise ConfigError(f"no hostile case {name!r}; the names are those of CASES")


def cases_for(entry: EntryPoint) -> list[HostileCase]:
    """Every case that applies to ``entry``, in corpus order."""
    return [c for c in CASES if entry in c.expect]
