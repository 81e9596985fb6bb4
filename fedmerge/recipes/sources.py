"""Recipe sources: the models a recipe names, opened lazily (safetensors headers, store manifests,
peft adapters merged into their base) and read one tensor at a time; layer maps for slicing."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedmerge.delta import hf
from fedmerge.delta.lora import load_peft_adapter
from fedmerge.delta.state_dict import accumulation_dtype
from fedmerge.errors import FedMergeError
from fedmerge.recipes.schema import ADAPTER_CONFIG, ModelRef, RecipeModelError, SliceError
from fedmerge.store import ModelStore
from fedmerge.store.blobs import read_blob
from fedmerge.store.errors import UnknownVersionError
from fedmerge.store.safetensors_format import dtype_from_name


# ----------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Spec:
    dtype: torch.dtype
    shape: tuple[int, ...]


class Source:
    """A model's tensors, opened lazily: :attr:`specs` from headers, :meth:`get` reads one tensor."""

    ref: ModelRef
    specs: dict[str, Spec]

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def files(self) -> dict[str, bytes]:
        """Companion files (config.json, tokenizer files) of the model, if any."""
        return {}

    def close(self) -> None:
        pass


class HFSource(Source):
    """A Hugging Face model directory (memory-mapped safetensors)."""

    def __init__(self, ref: ModelRef) -> None:

        assert ref.path is not None
        self.ref = ref
        if not ref.path.is_dir():
            raise RecipeModelError(f"model {ref.raw!r}: {ref.path} does not exist or is not a directory")
        try:
            self.ckpt = hf.HFCheckpoint(ref.path)
        except FedMergeError as exc:
            raise RecipeModelError(f"model {ref.raw!r}: {exc}") from None
        try:
            self.specs = {n: Spec(dtype_from_name(i.dtype), i.shape) for n, i in self.ckpt.tensors.items()}
        except FedMergeError as exc:
            self.ckpt.close()
            raise RecipeModelError(f"model {ref.raw!r}: {exc}") from None

    def get(self, name: str) -> torch.Tensor:
        return self.ckpt.get(name)

    def files(self) -> dict[str, bytes]:

        assert self.ref.path is not None
        return hf.companion_files(self.ref.path)

    def close(self) -> None:
        self.ckpt.close()


class StoreSource(Source):
    """The materialised weights of a store version, one tensor at a time (root + Σ first-parent deltas)."""

    def __init__(self, ref: ModelRef, store: ModelStore) -> None:

        assert ref.store_ref is not None
        self.ref, self.store = ref, store
        try:
            self.version = store.get(ref.store_ref)
        except UnknownVersionError as exc:
            raise RecipeModelError(f"model {ref.raw!r}: {exc}") from None
        self.chain = store.chain(self.version)
        bad = [v.id for v in self.chain[1:] if v.kind != "task_vector"]
        if bad:
            raise RecipeModelError(f"model {ref.raw!r} descends through {bad[0]}, which is not a task vector")
        self.specs = {s.name: Spec(s.dtype, tuple(s.shape)) for s in store.materialized_specs(self.version)}

    def get(self, name: str) -> torch.Tensor:

        root, deltas = self.chain[0], self.chain[1:]
        w = read_blob(self.store.blobs, root.tensors[name].blob, what=f"version {root.id} tensor {name!r}")
        if not w.is_floating_point() or not deltas:
            return w
        acc = w.to(accumulation_dtype(w.dtype))
        for d in deltas:
            acc += read_blob(
                self.store.blobs, d.tensors[name].blob, what=f"version {d.id} tensor {name!r}"
            ).to(acc.dtype)
        return acc.to(w.dtype)

    def files(self) -> dict[str, bytes]:
        return dict(self.store.read_files(self.version))


class AdapterSource(Source):
    """A base with a peft LoRA adapter merged in: θ = θ_base + s·B·A on the adapted weights."""

    def __init__(self, ref: ModelRef, base: Source) -> None:

        assert ref.adapter is not None
        self.ref, self.base = ref, base
        self.specs = base.specs
        if not (ref.adapter / ADAPTER_CONFIG).is_file():
            raise RecipeModelError(
                f"model {ref.raw!r}: {ref.adapter} is not a peft adapter (no {ADAPTER_CONFIG})"
            )
        try:
            self.adapter = load_peft_adapter(ref.adapter)
        except FedMergeError as exc:
            raise RecipeModelError(f"model {ref.raw!r}: {exc}") from None
        if self.adapter.extra or not self.adapter.modules:
            raise RecipeModelError(
                f"model {ref.raw!r}: only adapters of linear LoRA factors are merged (no modules_to_save)"
            )
        for name, m in sorted(self.adapter.modules.items()):
            out_in = (int(m.B.shape[0]), int(m.A.shape[1]))
            shape = out_in[::-1] if self.adapter.fan_in_fan_out else out_in
            spec = self.specs.get(name)
            if spec is None or spec.shape != shape:
                raise RecipeModelError(
                    f"model {ref.raw!r}: the adapter's module {name!r} (ΔW {shape}) is not a weight of its "
                    f"base {base.ref.raw!r} ({'missing' if spec is None else spec.shape}); "
                    "pass the base it was trained on"
                )

    def get(self, name: str) -> torch.Tensor:
        w = self.base.get(name)
        m = self.adapter.modules.get(name)
        if m is None:
            return w
        d = m.delta()
        return (w.float() + (d.T if self.adapter.fan_in_fan_out else d)).to(w.dtype)

    def files(self) -> dict[str, bytes]:
        return self.base.files()


# -------------------------------------------------------------------------------------- layer maps
LAYER_RE = re.compile(r"^(?P<prefix>.+?\.(?:layers|h|layer|blocks))\.(?P<idx>\d+)\.(?P<rest>.+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
PRE_MARKERS = ("embed", "wte", "wpe")


def layer_template(specs: Mapping[str, Spec]) -> tuple[str | None, int, dict[str, Spec], dict[str, Spec]]:
    """(layer prefix, number of layers, rest → spec of one layer, non-layer specs) of a model's tensors."""
    prefixes: set[str] = set()
    per_layer: dict[int, dict[str, Spec]] = {}
    other: dict[str, Spec] = {}
    for name, spec in specs.items():
        m = LAYER_RE.match(name)
        if m is None:
            other[name] = spec
            continue
        prefixes.add(m["prefix"])
        per_layer.setdefault(int(m["idx"]), {})[m["rest"]] = spec
    if len(prefixes) != 1:
        return None, 0, {}, dict(specs)
    count = max(per_layer) + 1
    templates = [per_layer.get(i) for i in range(count)]
    if any(t != templates[0] for t in templates):
        raise SliceError("the model's layers do not all hold the same tensors; it cannot be sliced by layer")
    return prefixes.pop(), count, templates[0] or {}, other
