"""Hugging Face model directories: find their weights, read them as one state dict, keep their other files.

A model directory as ``save_pretrained(safe_serialization=True)`` writes it::

    config.json                                   the architecture (``model_type``, ``architectures``)
    model.safetensors                             all weights, or
    model-00001-of-0000N.safetensors …            shards listed by
    model.safetensors.index.json                  {"metadata": {...}, "weight_map": {name: shard}}
    generation_config.json, tokenizer.json, …     everything else: *companion files*

:class:`HFCheckpoint` opens the weights (one file or every shard of the index) through memory-mapped
``safe_open`` handles, so names, dtypes and shapes are known from the headers before any tensor is
read. :func:`load_hf_state_dict` reads them all; :func:`companion_files` returns the other files a
store keeps with a version so that every export loads with ``from_pretrained``.

Refused, each with a :class:`HFModelError` subclass naming the directory and what is wrong: a
directory with ``pytorch_model*.bin`` (or other pickle/TF/Flax) weights only
(:class:`UnsupportedWeightsError`: convert with ``save_pretrained(safe_serialization=True)``), one
without weights, an index naming a shard that is missing or a tensor its shard does not hold, two
files holding the same tensor (:class:`InconsistentCheckpointError`), a missing ``config.json`` where
one is required (:class:`MissingConfigError`), and weights whose names or shapes do not match the
architecture ``config.json`` declares (:class:`ArchitectureMismatchError`, checked when
``transformers`` is installed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmerge.errors import ConfigError

CONFIG_FILE = "config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
README = "README.md"
UNSUPPORTED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".pkl")
"""Weight formats read only through pickle or another framework: refused, never loaded."""
MAX_COMPANION_BYTES = 256 << 20
"""Largest companion file kept (tokenizer files of large vocabularies are tens of MiB)."""


class HFModelError(ConfigError):
    """A Hugging Face model directory cannot be used as asked (the message names the directory)."""


class UnsupportedWeightsError(HFModelError):
    """The weights are not safetensors (``pytorch_model.bin`` and other pickle-based formats)."""


class MissingConfigError(HFModelError):
    """The directory has no ``config.json``, so exports could not be loaded with ``from_pretrained``."""


class InconsistentCheckpointError(HFModelError):
    """The index and the shards disagree, a shard is missing, or a tensor is stored twice."""


class ArchitectureMismatchError(HFModelError):
    """The weights' names or shapes are not those of the architecture ``config.json`` declares."""


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name == SAFE_INDEX or name.endswith(UNSUPPORTED_WEIGHT_SUFFIXES)


def is_hf_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a ``config.json`` or a safetensors model file/index."""
    p = Path(path)
    return p.is_dir() and any((p / n).is_file() for n in (CONFIG_FILE, SAFE_SINGLE, SAFE_INDEX))


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files holding the model's weights: every shard the index names, else
    ``model.safetensors``, else the single ``*.safetensors`` file of the directory.

    Raises :class:`UnsupportedWeightsError` for ``.bin``-only directories, :class:`HFModelError` when
    there are no weights or several unindexed safetensors files, :class:`InconsistentCheckpointError`
    when the index names a missing shard.
    """
    d = Path(directory)
    if not d.is_dir():
        raise HFModelError(f"{d} is not a directory; pass a Hugging Face model directory")
    index = d / SAFE_INDEX
    if index.is_file():
        weight_map = read_index(d)
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if "/" in shard or shard.startswith(".") or not (d / shard).is_file():
                raise InconsistentCheckpointError(
                    f"{index} lists shard {shard!r}, which is not a file in {d}; copy every shard"
                )
        return [d / s for s in shards]
    if (d / SAFE_SINGLE).is_file():
        return [d / SAFE_SINGLE]
    safes = sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(".safetensors"))
    if len(safes) == 1:
        return safes
    if len(safes) > 1:
        raise InconsistentCheckpointError(
            f"{d} holds {len(safes)} safetensors files ({', '.join(p.name for p in safes[:3])}, …) but no "
            f"{SAFE_INDEX}; save the model with save_pretrained so the shards are indexed"
        )
    other = sorted(
        p.name for p in d.iterdir() if p.is_file() and p.name.endswith(UNSUPPORTED_WEIGHT_SUFFIXES)
    )
    if other:
        raise UnsupportedWeightsError(
            f"{d} holds weights only as {', '.join(other[:3])}: pickle-based checkpoints are not read "
            "(loading them can run code). Convert once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
        )
    raise HFModelError(
        f"{d} holds no model weights ({SAFE_SINGLE} or {SAFE_INDEX}); is it a model directory?"
    )


def read_index(directory: Path) -> dict[str, str]:
    """``weight_map`` of ``model.safetensors.index.json`` (tensor name → shard file name)."""
    path = directory / SAFE_INDEX
    try:
        doc = json.loads(path.read_text())
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InconsistentCheckpointError(f"{path} is not a safetensors index ({exc!r})") from None
    return dict(weight_map)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of a checkpoint as its header describes it: file, safetensors dtype name, shape."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


class HFCheckpoint:
    """The weights of a model directory or one safetensors file, opened lazily (headers only).

    ``tensors`` maps every name to its :class:`TensorInfo`; :meth:`get` reads one tensor; use as a
    context manager (the files stay memory-mapped while open).
    """

    def __init__(self, path: str | Path) -> None:
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        self.path = p
        self.files = weight_files(p) if p.is_dir() else [p]
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            for f in self.files:
                handle = self._stack.enter_context(safe_open(str(f), framework="pt"))
                self._handles[f] = handle
                for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    if name in self.tensors:
                        raise InconsistentCheckpointError(
                            f"tensor {name!r} is stored in both {self.tensors[name].file.name} and {f.name}; "
                            "re-save the model"
                        )
                    sl = handle.get_slice(name)
                    self.tensors[name] = TensorInfo(f, str(sl.get_dtype()), tuple(sl.get_shape()))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            self._stack.close()
            if isinstance(exc, HFModelError):
                raise
            raise HFModelError(f"{p}: weights are not readable safetensors ({exc})") from None
        except BaseException:
            self._stack.close()
            raise
        if p.is_dir() and (p / SAFE_INDEX).is_file():
            self._check_index(read_index(p))

    def _check_index(self, weight_map: Mapping[str, str]) -> None:
        for name, shard in sorted(weight_map.items()):
            info = self.tensors.get(name)
            if info is None or info.file.name != shard:
                self._stack.close()
                where = "no shard" if info is None else info.file.name
                raise InconsistentCheckpointError(
                    f"{self.path / SAFE_INDEX} maps {name!r} to {shard} but {where} holds it; re-save it"
                )
        extra = sorted(set(self.tensors) - set(weight_map))
        if extra:
            self._stack.close()
            raise InconsistentCheckpointError(
                f"{self.tensors[extra[0]].file.name} holds {extra[0]!r}, which {SAFE_INDEX} does not list; "
                "re-save the model"
            )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: i.shape for n, i in self.tensors.items()}

    def get(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` (a copy; the files stay untouched)."""
        info = self.tensors[name]
        tensor: torch.Tensor = self._handles[info.file].get_tensor(name)
        return tensor

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor), sorted by name, one tensor read at a time."""
        for name in sorted(self.tensors):
            yield name, self.get(name)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model directory (sharded or not) or safetensors file, in its
    stored dtype. Raises the :class:`HFModelError` subclasses of the module docstring."""
    with HFCheckpoint(path) as ckpt:
        return dict(ckpt.items())


def read_config(directory: str | Path) -> dict[str, Any]:
    """``config.json`` as a dict; :class:`MissingConfigError` if absent, :class:`HFModelError` if not JSON."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise MissingConfigError(
            f"{directory} has no {CONFIG_FILE}: without it exports cannot be loaded with from_pretrained. "
            "Save the model with save_pretrained (it writes config.json), or copy the config of the "
            "architecture these weights belong to"
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HFModelError(f"{path} is not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model_type"), str):
        raise HFModelError(f"{path} has no 'model_type'; it is not a transformers model config")
    return doc


def companion_files(directory: str | Path) -> dict[str, bytes]:
    """The non-weight files of a model directory (config, generation config, tokenizer, …): file name →
    bytes. Left out: weight files and the index, ``README.md`` (an export writes its own model card),
    hidden files, sub-directories. Files over :data:`MAX_COMPANION_BYTES` are refused."""
    d = Path(directory)
    out: dict[str, bytes] = {}
    for p in sorted(d.iterdir()):
        if not p.is_file() or p.name.startswith(".") or _is_weight_file(p.name) or p.name == README:
            continue
        size = p.stat().st_size
        if size > MAX_COMPANION_BYTES:
            raise HFModelError(
                f"{p} is {size} bytes, above the {MAX_COMPANION_BYTES} kept with a version; move it out"
            )
        out[p.name] = p.read_bytes()
    return out


@dataclass(frozen=True)
class ArchitectureCheck:
    """What :func:`check_architecture` compared: the class it built, or why it could not."""

    architecture: str | None
    checked: bool
    note: str = ""
    tied: list[str] = field(default_factory=list)


def skeleton(directory: str | Path) -> Any:
    """The model the directory's ``config.json`` declares (its ``architectures[0]``), built on the
    meta device (no memory, no weights), or ``None`` when ``transformers`` is missing or the config
    names no architecture transformers knows."""
    try:
        import transformers
    except ImportError:
        return None
    config = read_config(directory)
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
    if cls is None:
        return None
    cfg = transformers.AutoConfig.from_pretrained(str(directory))
    with torch.device("meta"):
        return cls._from_config(cfg)


def check_architecture(directory: str | Path, shapes: Mapping[str, tuple[int, ...]]) -> ArchitectureCheck:
    """Compare tensor names and shapes with the model ``config.json`` declares (built on the meta
    device). Every stored tensor must be a parameter or buffer of that model with its shape, and
    every parameter must be stored unless it is tied to one that is (``lm_head`` ↔ embeddings).
    Raises :class:`ArchitectureMismatchError` naming the first offending tensor; returns
    ``checked=False`` with a note when transformers or the architecture is unavailable."""
    config = read_config(directory)
    arch = (config.get("architectures") or [None])[0]
    model = skeleton(directory)
    if model is None:
        return ArchitectureCheck(arch, False, "transformers is not installed or the architecture is unknown")
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    params = dict(model.named_parameters(remove_duplicate=False))
    unique = {n for n, _ in model.named_parameters()}
    for name in sorted(shapes):
        if name not in expected:
            raise ArchitectureMismatchError(
                f"{directory}: tensor {name!r} is not part of {arch} as {CONFIG_FILE} declares it; "
                "the weights belong to another model or config.json was edited"
            )
        if tuple(shapes[name]) != expected[name]:
            raise ArchitectureMismatchError(
                f"{directory}: tensor {name!r} has shape {tuple(shapes[name])}, but {arch} with this "
                f"{CONFIG_FILE} has {expected[name]}; the config does not describe these weights"
            )
    tied: list[str] = []
    for name in sorted(params):
        if name in shapes:
            continue
        twins = [n for n, p in params.items() if p is params[name] and n != name]
        if any(t in shapes for t in twins):
            tied.append(name)
            continue
        if name in unique or not twins:
            raise ArchitectureMismatchError(
                f"{directory}: parameter {name!r} of {arch} is not in the weights; the checkpoint is "
                "incomplete or belongs to another model"
            )
    return ArchitectureCheck(arch, True, tied=tied)
