"""Export a version's full weights in the Hugging Face sharded-safetensors layout, streaming.

Output directory (what ``transformers``' ``save_pretrained(safe_serialization=True)`` writes)::

    model.safetensors                                  when everything fits in one shard, else
    model-00001-of-0000N.safetensors …                 shards of at most ``max_shard_bytes`` each
    model.safetensors.index.json                       {"metadata": {"total_size"}, "weight_map"}
    fedmerge-version.json                              the version's manifest (provenance)

Tensors are materialised one at a time (:meth:`ModelStore.iter_materialized`) and streamed into
shards whose headers are planned up front, so peak memory is about one tensor, not one shard or
one model. Files are written into a hidden staging directory, fsynced, and the directory is
renamed onto ``out_dir`` at the end: ``out_dir`` appears complete or not at all.

The peft-adapter export (:func:`export_peft`) refactorises each summed delta by truncated SVD
through :mod:`fedmerge.delta.lora` (imported lazily).
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmerge.errors import ConfigError
from fedmerge.store.blobs import fsync_dir
from fedmerge.store.safetensors_format import TensorSpec, write_streaming

if TYPE_CHECKING:
    from fedmerge.store.model_store import ModelStore

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROVENANCE_FILE = "fedmerge-version.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"


@dataclass(frozen=True)
class ExportResult:
    version: str
    path: Path
    files: list[str] = field(default_factory=list)
    total_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "path": str(self.path),
            "files": self.files,
            "total_bytes": self.total_bytes,
            **self.extra,
        }


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, order-preserving packing into shards of ≤ ``max_shard_bytes``; a larger tensor gets its own."""
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes is {max_shard_bytes}; pass a positive number of bytes")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def staging_dir(out_dir: Path) -> Path:
    """A fresh hidden sibling of ``out_dir``; refuses an ``out_dir`` that already has content."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"export target {out_dir} exists and is not empty; pick a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.partial-{secrets.token_hex(4)}"
    stage.mkdir()
    return stage


def publish(stage: Path, out_dir: Path) -> None:
    """fsync ``stage`` and rename it onto ``out_dir`` (an empty existing ``out_dir`` is replaced)."""
    fsync_dir(stage)
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(stage, out_dir)
    fsync_dir(out_dir.parent)


def export_safetensors(
    store: ModelStore,
    ref: str,
    out_dir: str | os.PathLike[str],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportResult:
    """Write version ``ref``'s materialised weights to ``out_dir`` (layout in the module docstring)."""
    version = store.get(ref)
    out = Path(out_dir)
    specs = store.materialized_specs(version)
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(len(shards))
    stage = staging_dir(out)
    try:
        tensors = store.iter_materialized(version)
        for shard, name in zip(shards, names, strict=True):
            with (stage / name).open("wb") as fh:
                write_streaming(fh, shard, tensors, metadata={"format": "pt"})
                fh.flush()
                os.fsync(fh.fileno())
        total = sum(s.nbytes for s in specs)
        files = list(names)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {s.name: n for shard, n in zip(shards, names, strict=True) for s in shard},
            }
            _write_file(stage / INDEX_FILE, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
            files.append(INDEX_FILE)
        _write_file(stage / PROVENANCE_FILE, version.to_json().encode())
        files.append(PROVENANCE_FILE)
        publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return ExportResult(version=version.id, path=out, files=files, total_bytes=total)


def export_peft(
    store: ModelStore,
    ref: str,
    out_dir: str | os.PathLike[str],
    *,
    rank: int,
    alpha: float | None = None,
) -> ExportResult:
    """Write θ_version − θ_root as a peft LoRA adapter of ``rank`` (``adapter_model.safetensors`` + config).

    Every 2-D tensor of the summed delta chain is refactorised on its own by truncated SVD
    (:func:`fedmerge.delta.lora.delta_to_lora`: the best rank-r approximation, Eckart–Young), so memory
    holds one dense ΔW plus the rank-r factors. Other tensors (biases, norms) are not representable
    as LoRA factors and are left out; their names are returned in ``extra["skipped"]``. The relative
    residual ‖ΔW − s·B·A‖_F / ‖ΔW‖_F of each module is in ``extra["residuals"]``.
    """
    lora = importlib.import_module("fedmerge.delta.lora")
    version = store.get(ref)
    if version.kind == "full":
        raise ConfigError(f"version {version.id} is a full-weights root; a peft adapter exports a delta")
    modules: dict[str, Any] = {}
    residuals: dict[str, float] = {}
    skipped: list[str] = []
    for name, delta in store.iter_total_delta(version):
        if delta.dim() != 2:
            skipped.append(name)
            continue
        one = lora.delta_to_lora({name: delta}, rank, alpha)
        modules.update(one.modules)
        residuals.update(one.residuals)
    if not modules:
        raise ConfigError(f"version {version.id} has no 2-D tensor to refactorise; a peft adapter needs one")
    adapter = lora.LoraAdapter(
        modules,
        rank,
        float(rank if alpha is None else alpha),
        tuple(sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in modules})),
        residuals=residuals,
    )
    out = Path(out_dir)
    stage = staging_dir(out)
    try:
        lora.save_peft_adapter(adapter, stage)
        _write_file(stage / PROVENANCE_FILE, version.to_json().encode())
        for path in stage.iterdir():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        files = sorted(p.name for p in stage.iterdir())
        publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return ExportResult(
        version=version.id,
        path=out,
        files=files,
        total_bytes=sum((out / f).stat().st_size for f in files),
        extra={
            "rank": rank,
            "residuals": residuals,
            "max_relative_residual": max(residuals.values()),
            "skipped": skipped,
        },
    )
