"""Export a version's full weights in the Hugging Face sharded-safetensors layout, streaming.

Output directory (what ``transformers``' ``save_pretrained(safe_serialization=True)`` writes)::

    model.safetensors                                  when everything fits in one shard, else
    model-00001-of-0000N.safetensors …                 shards of at most ``max_shard_bytes`` each
    model.safetensors.index.json                       {"metadata": {"total_size"}, "weight_map"}
    config.json, generation_config.json, tokenizer…    the root's kept files (``ModelStore.read_files``)
    README.md                                          the model card (:mod:`fedmerge.store.card`)
    fedmerge-version.json                              the version's manifest (provenance)

With the files a Hugging Face base was committed with (``fedmerge init``), the directory loads with
``AutoModelForCausalLM.from_pretrained`` (or the architecture's Auto class) as it is, in the base's
dtype (bf16 and fp16 stay so: θ is cast back to the root's dtype).

Tensors are materialised one at a time (:meth:`ModelStore.iter_materialized`) and streamed into
shards whose headers are planned up front, so peak memory is about one tensor, not one shard or
one model. Files are written into a hidden staging directory, fsynced, and the directory is
renamed onto ``out_dir`` at the end: ``out_dir`` appears complete or not at all. The files are
written first and fsynced together (concurrently) before that rename.

The peft-adapter export (:func:`export_peft`) refactorises each non-zero summed delta by SVD through
:mod:`fedmerge.delta.lora` (imported lazily), exactly unless a smaller rank is asked for.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmerge.errors import ConfigError
from fedmerge.store.blobs import fsync_dir, fsync_path
from fedmerge.store.card import MODEL_CARD, model_card
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


def _write_file(path: Path, data: bytes, *, sync: bool = True) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        if sync:
            os.fsync(fh.fileno())


def fsync_files(paths: list[Path]) -> None:
    """fsync every file of ``paths``, concurrently (the fsyncs share the file system's journal commits)."""
    if len(paths) > 1:
        with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
            list(pool.map(fsync_path, paths))
    elif paths:
        fsync_path(paths[0])


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
        total = sum(s.nbytes for s in specs)
        files = list(names)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {s.name: n for shard, n in zip(shards, names, strict=True) for s in shard},
            }
            index_text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            _write_file(stage / INDEX_FILE, index_text.encode(), sync=False)
            files.append(INDEX_FILE)
        for fname, data in store.read_files(version).items():
            _write_file(stage / fname, data, sync=False)
            files.append(fname)
        _write_file(stage / MODEL_CARD, model_card(store, version, kind="full").encode(), sync=False)
        _write_file(stage / PROVENANCE_FILE, version.to_json().encode(), sync=False)
        files += [MODEL_CARD, PROVENANCE_FILE]
        fsync_files([stage / f for f in files])  # every file durable before the directory is published
        publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return ExportResult(version=version.id, path=out, files=files, total_bytes=total)


def module_layouts(store: ModelStore, version: Any) -> dict[str, str] | None:
    """Weight name → how peft adapts it, from the root's ``config.json`` (the model built on the meta
    device): ``"linear"`` (ΔW = s·B·A), ``"conv1d"`` (transformers' Conv1D stores W as in × out:
    ΔW = (s·B·A)ᵀ), ``"embedding"`` (``lora_embedding_A/B``: ΔW = (s·B·A)ᵀ) or ``"other"`` (peft's
    LoRA cannot adapt it). ``None`` when the root has no ``config.json`` or transformers is missing:
    every 2-D tensor is then treated as a linear weight."""
    files = store.read_files(version)
    if "config.json" not in files:
        return None
    import tempfile

    from fedmerge.delta import hf

    with tempfile.TemporaryDirectory(prefix="fedmerge-config-") as tmp:
        (Path(tmp) / "config.json").write_bytes(files["config.json"])
        try:
            model = hf.skeleton(tmp)
        except (hf.HFModelError, ValueError, KeyError, OSError):
            return None
    if model is None:
        return None
    import torch

    conv1d: tuple[type, ...] = ()
    try:
        from transformers.pytorch_utils import Conv1D

        conv1d = (Conv1D,)
    except ImportError:
        pass
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, torch.nn.Linear):
            kind = "linear"
        elif conv1d and isinstance(module, conv1d):
            kind = "conv1d"
        elif isinstance(module, torch.nn.Embedding):
            kind = "embedding"
        else:
            kind = "other"
        out[f"{name}.weight"] = kind
    return out


def _targets(exported: set[str], candidates: set[str]) -> list[str]:
    """peft ``target_modules``: a module type (last name part, e.g. ``q_proj``) where every candidate
    module of that type is exported, the full module names otherwise — so peft adapts exactly the
    exported modules and no other."""
    by_type: dict[str, set[str]] = {}
    for m in candidates | exported:
        by_type.setdefault(m.rsplit(".", 1)[-1], set()).add(m)
    out: list[str] = []
    for kind, members in sorted(by_type.items()):
        chosen = members & exported
        if not chosen:
            continue
        out.extend([kind] if chosen == members else sorted(chosen))
    return out


def export_peft(
    store: ModelStore,
    ref: str,
    out_dir: str | os.PathLike[str],
    *,
    rank: int | None = None,
    alpha: float | None = None,
) -> ExportResult:
    """Write θ_version − θ_root as a peft LoRA adapter (``adapter_model.safetensors`` + config + card).

    Only modules whose summed delta is non-zero are targeted (``target_modules`` names exactly them).
    Each is factorised on its own by SVD (:func:`fedmerge.delta.lora.delta_to_lora`), so memory holds
    one dense ΔW plus its factors: ``rank=None`` (default) at the module's exact numerical rank (the
    adapter's ``r`` is the largest, ``rank_pattern`` gives the others), a given ``rank`` truncates every
    module to its best rank-r approximation (Eckart–Young) and a :class:`LoraTruncationWarning` reports
    the error. With the root's ``config.json``, transformers' Conv1D weights (GPT-2) are written
    transposed as peft's ``fan_in_fan_out`` expects and embeddings as ``lora_embedding_A/B``, so the
    directory loads with ``PeftModel.from_pretrained`` on the base.

    ``extra``: ``rank`` (the adapter's r), ``ranks`` per module, ``residuals`` (relative
    ‖ΔW − s·B·A‖_F / ‖ΔW‖_F per module), ``total_residual`` (over all modules), ``max_relative_residual``,
    ``skipped`` (tensor → why it is not in the adapter: ``zero`` delta, not ``2-D``, not a LoRA layer).
    """
    lora = importlib.import_module("fedmerge.delta.lora")
    import torch

    version = store.get(ref)
    if version.kind == "full":
        raise ConfigError(f"version {version.id} is a full-weights root; a peft adapter exports a delta")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank is {rank}; pass a positive LoRA rank, or none for the exact rank")
    layouts = module_layouts(store, version)
    root = store.root_of(version)
    modules: dict[str, Any] = {}
    exact_rank = 0
    ranks: dict[str, int] = {}
    residuals: dict[str, float] = {}
    skipped: dict[str, str] = {}
    norms2: dict[str, float] = {}
    kinds: dict[str, str] = {}
    for name, delta in store.iter_total_delta(version):
        kind = "linear" if layouts is None else layouts.get(name, "other")
        if delta.dim() != 2:
            skipped[name] = "not 2-D"
            continue
        if kind == "other":
            skipped[name] = "not a Linear, Conv1D or Embedding weight (peft cannot adapt it)"
            continue
        if not bool(delta.any()):
            skipped[name] = "zero"
            continue
        matrix = delta if kind == "linear" else delta.T  # B·A is out × in, or W's transpose
        one = lora.delta_to_lora({name: matrix}, rank)
        modules[name] = one.modules[name]
        ranks[name], residuals[name], kinds[name] = one.rank, one.residuals[name], kind
        exact_rank = max(exact_rank, one.exact_rank or 0)
        norms2[name] = float(delta.double().pow(2).sum())
    if not modules:
        raise ConfigError(
            f"version {version.id} changes no tensor a LoRA adapter can hold (skipped: "
            f"{', '.join(f'{n} ({why})' for n, why in sorted(skipped.items())[:4])}); export the full weights"
        )
    r = max(ranks.values())
    a = float(r if alpha is None else alpha)
    linear = {n: m for n, m in modules.items() if kinds[n] != "embedding"}
    extras: dict[str, torch.Tensor] = {}
    for name in sorted(n for n in modules if kinds[n] == "embedding"):
        m = modules[name]
        module = name.removesuffix(".weight")
        s = lora.scaling_for(a, m.rank)
        extras[f"{lora.PEFT_PREFIX}{module}.lora_embedding_A"] = m.A.contiguous()
        extras[f"{lora.PEFT_PREFIX}{module}.lora_embedding_B"] = (m.B * (m.scaling / s)).contiguous()
    conv = [n for n in linear if kinds[n] == "conv1d"]
    exported = {n.removesuffix(".weight") for n in modules}
    candidates = (
        {n.removesuffix(".weight") for n, k in layouts.items() if k != "other" and n in root.tensors}
        if layouts is not None
        else {n.removesuffix(".weight") for n, e in root.tensors.items() if len(e.shape) == 2}
    )
    adapter = lora.LoraAdapter(
        linear,
        r,
        a,
        tuple(_targets(exported, candidates)),
        fan_in_fan_out=bool(conv) and len(conv) * 2 >= len(linear),
        config={"base_model_name_or_path": root.name or root.id, "task_type": None, "bias": "none"},
        extra=extras,
        residuals=residuals,
    )
    embedding_ranks = {
        n.removesuffix(".weight"): modules[n].rank
        for n in modules
        if kinds[n] == "embedding" and modules[n].rank != r
    }
    total = sum(norms2.values())
    total_residual = (sum(residuals[n] ** 2 * norms2[n] for n in norms2) / total) ** 0.5 if total > 0 else 0.0
    summary = {
        "rank": r,
        "ranks": ranks,
        "residuals": residuals,
        "total_residual": total_residual,
        "exact_rank": exact_rank,
        "max_relative_residual": max(residuals.values()),
        "skipped": skipped,
    }
    report = lora.LoraAdapter({}, r, a, residuals=residuals, total_residual=total_residual)
    report.exact_rank = exact_rank
    lora.report_truncation(report, f"peft export of {version.id}")
    out = Path(out_dir)
    stage = staging_dir(out)
    try:
        lora.save_peft_adapter(adapter, stage)
        if embedding_ranks:  # save_peft_adapter lists linear modules only in rank_pattern
            cfg_path = stage / lora.ADAPTER_CONFIG
            cfg = json.loads(cfg_path.read_text())
            cfg["rank_pattern"] = {**cfg["rank_pattern"], **embedding_ranks}
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        card_extra = {k: v for k, v in summary.items() if k != "residuals"}
        _write_file(stage / MODEL_CARD, model_card(store, version, kind="peft", extra=card_extra).encode())
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
        extra=summary,
    )
