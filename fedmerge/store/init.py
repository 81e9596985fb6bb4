"""Create a store's root version from a model a user already has (``fedmerge init``).

Accepted bases (:func:`init_store`):

- a **Hugging Face model directory** (``config.json`` plus ``model.safetensors`` or shards with
  ``model.safetensors.index.json``): its tensors become the root's weights in their own dtype (bf16
  and fp16 stay so), and its other files (``config.json``, ``generation_config.json``, tokenizer
  files, …) are kept with the root as content-addressed blobs, so every export of every later
  version is a directory ``from_pretrained`` loads as it is. The tensors are checked against the
  architecture ``config.json`` declares (names and shapes; when transformers is installed);
- a **single safetensors file**: weights only (exports then carry no ``config.json``);
- either of these **plus a peft LoRA adapter** trained on it: the root is the base, and the
  adapter's ΔW = s·B·A (zero elsewhere) is committed on top as the first task-vector version
  (``method="peft-adapter"``), which ``latest`` names; peft exports are relative to the base.

Refused before anything is written (so no version changes), each with one
:class:`~fedmerge.errors.ConfigError` subclass naming what is wrong: a directory without
``config.json`` (:class:`~fedmerge.delta.hf.MissingConfigError`), ``.bin``-only weights
(:class:`~fedmerge.delta.hf.UnsupportedWeightsError`), tensors that do not match the config
(:class:`~fedmerge.delta.hf.ArchitectureMismatchError`), a peft adapter passed as the base or one
whose modules are not weights of the base (:class:`AdapterBaseMismatchError`), a ``config.json``
whose ``torch_dtype`` no floating tensor has (:class:`DtypeMismatchError`), a store that already has
versions (:class:`StoreNotEmptyError`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmerge.delta import hf
from fedmerge.delta.lora import ADAPTER_CONFIG, LoraAdapter, load_peft_adapter, lora_to_delta
from fedmerge.errors import ConfigError
from fedmerge.store.manifest import Version
from fedmerge.store.model_store import ModelStore
from fedmerge.store.safetensors_format import SafetensorsFormatError, dtype_from_name


class AdapterBaseMismatchError(ConfigError):
    """A peft adapter does not fit the base: a module it adapts is not a 2-D weight of the base, or
    its B·A has another shape (it was trained on another model)."""


class StoreNotEmptyError(ConfigError):
    """``init`` was pointed at a store that already has versions."""


@dataclass(frozen=True)
class InitResult:
    """What :func:`init_store` committed: the root, the adapter's version if one was given, the kept
    files and whether the tensors were checked against ``config.json``."""

    root: Version
    adapter: Version | None
    files: list[str] = field(default_factory=list)
    architecture: str | None = None
    architecture_checked: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root.id,
            "root_hash": self.root.content_hash,
            "adapter_version": self.adapter.id if self.adapter else None,
            "latest": (self.adapter or self.root).id,
            "tensors": len(self.root.tensors),
            "files": self.files,
            "architecture": self.architecture,
            "architecture_checked": self.architecture_checked,
            "note": self.note,
        }


class _LazyWeights(Mapping[str, torch.Tensor]):
    """The checkpoint's tensors read one at a time on access (the commit never holds them all)."""

    def __init__(self, ckpt: hf.HFCheckpoint) -> None:
        self._ckpt = ckpt

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._ckpt.tensors:
            raise KeyError(name)
        return self._ckpt.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._ckpt.tensors))

    def __len__(self) -> int:
        return len(self._ckpt.tensors)


@dataclass(frozen=True)
class BaseModel:
    """A checked base: its open checkpoint, kept files, name and what the architecture check found."""

    checkpoint: hf.HFCheckpoint
    files: dict[str, bytes]
    name: str
    metadata: dict[str, Any]
    check: hf.ArchitectureCheck


def open_base(path: str | os.PathLike[str], name: str | None = None) -> BaseModel:
    """Open and check a base (module docstring): a Hugging Face directory or a safetensors file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(
            f"base {p} does not exist; pass a Hugging Face model directory or a .safetensors file"
        )
    if p.is_dir() and (p / ADAPTER_CONFIG).is_file() and not (p / hf.CONFIG_FILE).is_file():
        raise AdapterBaseMismatchError(
            f"{p} is a peft adapter, not a base model; pass the model it was trained on as the base and "
            "the adapter separately (fedmerge init --base BASE_DIR --adapter ADAPTER_DIR)"
        )
    if p.is_file():
        if not p.name.endswith(".safetensors"):
            raise hf.UnsupportedWeightsError(
                f"{p} is not a safetensors file; only safetensors weights are read (pickle-based .bin/.pt "
                "files can run code). Convert with save_pretrained(out, safe_serialization=True)"
            )
        ckpt = hf.HFCheckpoint(p)
        check = hf.ArchitectureCheck(None, False, "a single safetensors file carries no config.json")
        meta: dict[str, Any] = {"source": "safetensors", "file": p.name}
        return BaseModel(ckpt, {}, name or p.stem, meta, check)
    hf.weight_files(p)  # a .bin-only or weightless directory is refused before the config is asked for
    config = hf.read_config(p)
    ckpt = hf.HFCheckpoint(p)
    try:
        check = hf.check_architecture(p, ckpt.shapes())
        files = hf.companion_files(p)
    except BaseException:
        ckpt.close()
        raise
    try:
        check_declared_dtype(p, config, ckpt)
    except BaseException:
        ckpt.close()
        raise
    default = config.get("_name_or_path") or p.resolve().name
    meta = {
        "source": "huggingface",
        "model_type": config["model_type"],
        "architecture": check.architecture,
        "architecture_checked": check.checked,
        "shards": len(ckpt.files),
        "dtypes": sorted({i.dtype for i in ckpt.tensors.values()}),
    }
    return BaseModel(ckpt, files, name or str(default), meta, check)


def adapter_task_vector(
    adapter_dir: str | os.PathLike[str],
    base: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    base_name: str,
) -> tuple[LoraAdapter, dict[str, torch.Tensor]]:
    """The adapter and its task vector over every floating base tensor: ΔW = s·B·A (transposed for
    ``fan_in_fan_out``) on the modules it adapts, zero elsewhere. ``base`` maps names to (shape, dtype).
    Raises :class:`AdapterBaseMismatchError` naming the module, both shapes and both base names."""
    adapter = load_peft_adapter(Path(adapter_dir))
    trained_on = adapter.config.get("base_model_name_or_path") or "an unnamed base"
    if adapter.extra:
        raise AdapterBaseMismatchError(
            f"{adapter_dir}: tensor {sorted(adapter.extra)[0]!r} is not a lora_A/lora_B factor of a linear "
            "layer (modules_to_save or embedding LoRA); only linear LoRA factors become a version"
        )
    if not adapter.modules:
        raise AdapterBaseMismatchError(f"{adapter_dir}: the adapter holds no LoRA modules")
    delta = lora_to_delta(adapter)
    for name, d in sorted(delta.items()):
        entry = base.get(name)
        if entry is None or len(entry[0]) != 2 or not entry[1].is_floating_point:
            raise AdapterBaseMismatchError(
                f"{adapter_dir}: the adapter adapts {name.removesuffix('.weight')!r}, which is not a 2-D "
                f"weight of the base {base_name!r}; trained on {trained_on!r} — pass that model as the base"
            )
        if tuple(d.shape) != tuple(entry[0]):
            raise AdapterBaseMismatchError(
                f"{adapter_dir}: module {name.removesuffix('.weight')!r} has B·A of shape {tuple(d.shape)} "
                f"but the base {base_name!r} has {name!r} of shape {tuple(entry[0])}; the adapter was "
                f"trained on {trained_on!r} — pass that model as the base"
            )
        if not bool(torch.isfinite(d).all()):
            raise AdapterBaseMismatchError(f"{adapter_dir}: module {name!r} holds NaN or infinite values")
    tau = {
        n: delta[n] if n in delta else torch.zeros(shape, dtype=torch.float32)
        for n, (shape, dtype) in sorted(base.items())
        if dtype.is_floating_point
    }
    return adapter, tau


def init_store(
    store: ModelStore | str | os.PathLike[str],
    base: str | os.PathLike[str],
    *,
    adapter: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> InitResult:
    """Create the root version of an empty store from ``base`` (and ``adapter``): see the module
    docstring. Everything is checked before the first write; the root is committed with the base's
    files, then the adapter's version. ``latest`` names the newest."""
    model = open_base(base, name)  # checked before the store directory is even created
    if not model.checkpoint.tensors:
        model.checkpoint.close()
        raise hf.HFModelError(f"base {base} holds no tensors; pass the model's weights")
    owned = not isinstance(store, ModelStore)
    with model.checkpoint as ckpt:
        s = ModelStore.open(store) if not isinstance(store, ModelStore) else store
        try:
            existing = s.list(limit=1)
            if existing:
                raise StoreNotEmptyError(
                    f"store {s.root} already has versions (newest {existing[0].id}); init creates the root "
                    "of a new store — pass an empty or new --store directory"
                )
            base_entries = {
                n: (i.shape, dtype_from_name(i.dtype)) for n, i in ckpt.tensors.items() if _known(i.dtype)
            }
            tau = None
            lora: LoraAdapter | None = None
            if adapter is not None:
                lora, tau = adapter_task_vector(adapter, base_entries, model.name)
            root = s.commit_base(
                _LazyWeights(ckpt), name=model.name, metadata=model.metadata, files=model.files
            )
            return _commit_adapter(s, root, model, adapter, lora, tau)
        finally:
            if owned:
                s.close()


def _commit_adapter(
    s: ModelStore,
    root: Version,
    model: BaseModel,
    adapter: str | os.PathLike[str] | None,
    lora: LoraAdapter | None,
    tau: dict[str, torch.Tensor] | None,
) -> InitResult:
    """Commit the checked adapter's task vector on top of the root (if any); the result of init."""
    adapter_version = None
    if tau is not None and lora is not None:
        adapter_version = s.commit(
            tau,
            parents=[root.id],
            method="peft-adapter",
            params={"r": lora.rank, "lora_alpha": lora.alpha, "use_rslora": lora.use_rslora},
            contributors=[],
            round=None,
            metrics={},
            privacy=None,
            metadata={
                "adapter": Path(adapter or "").resolve().name,
                "target_modules": list(lora.target_modules),
                "modules": sorted(lora.modules),
            },
        )
    return InitResult(
        root=root,
        adapter=adapter_version,
        files=sorted(model.files),
        architecture=model.check.architecture,
        architecture_checked=model.check.checked,
        note=model.check.note,
    )


class DtypeMismatchError(hf.HFModelError):
    """``config.json`` declares a dtype (``torch_dtype`` / ``dtype``) that none of the floating
    tensors has: ``from_pretrained`` would cast the weights, and exports would disagree with it."""


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def check_declared_dtype(directory: Path, config: Mapping[str, Any], ckpt: hf.HFCheckpoint) -> None:
    """Refuse (one :class:`DtypeMismatchError`) a model directory whose ``config.json`` says
    ``torch_dtype`` (or transformers' newer ``dtype``) is e.g. ``float16`` while no floating tensor of
    its checkpoint is: a bf16 checkpoint labelled fp16 loads as fp16 and loses range. ``"auto"``, an
    absent or an unknown value declares nothing. A checkpoint mixing dtypes (fp32 norms beside bf16
    weights) passes when the declared one is among them."""
    declared = config.get("torch_dtype", config.get("dtype"))
    if not isinstance(declared, str) or declared.removeprefix("torch.") not in _SAFETENSORS_DTYPES:
        return
    name = declared.removeprefix("torch.")
    counts: dict[str, int] = {}
    for info in ckpt.tensors.values():
        if _known(info.dtype) and dtype_from_name(info.dtype).is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
    if not counts or _SAFETENSORS_DTYPES[name] in counts:
        return
    held = ", ".join(f"{n} {_torch_name(d)}" for d, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    main = _torch_name(max(counts, key=lambda d: counts[d]))
    raise DtypeMismatchError(
        f"{directory / hf.CONFIG_FILE} says torch_dtype {name!r} but the weights are {held} tensor(s); "
        f"set its torch_dtype to {main!r}, or re-save the model with save_pretrained"
    )


def _torch_name(safetensors_dtype: str) -> str:
    return str(dtype_from_name(safetensors_dtype)).removeprefix("torch.")


def _known(dtype: str) -> bool:
    try:
        dtype_from_name(dtype)
    except SafetensorsFormatError:
        return False
    return True
