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

Every shard's header is planned up front and the file created at its final size; ``workers`` threads
(one per CPU by default) then write each tensor at its own offset with ``os.pwrite``, largest tensors
first. A tensor is computed in 1 MiB chunks (a stored tensor of an object store is copied in its
backend's ``read_chunk_bytes``): each blob of the chain is read once, every chunk hashed as it is
read, and a root's tensor is copied straight from that chunk buffer (no decoding, no fp32 round
trip). Every blob read is verified against its sha256 name; a mismatch fails the export and
removes the partial output. Peak memory is a few MiB per thread, whatever the model size. The
disk writeback of each written run is started while later bytes are written (``sync_file_range``
where available), so the fsyncs at the end have little left to wait for.

Files are written into a hidden staging directory; the files and the directory are fsynced together
(one concurrent batch), then the directory is renamed onto ``out_dir`` and its parent fsynced:
``out_dir`` appears complete or not at all, and once :func:`export_safetensors` returns it survives a
power loss.

The peft-adapter export (:func:`export_peft`) refactorises each non-zero summed delta by SVD through
:mod:`fedmerge.delta.lora` (imported lazily), exactly unless a smaller rank is asked for.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from fedmerge.delta.state_dict import accumulation_dtype
from fedmerge.errors import ConfigError
from fedmerge.fsutil import fsync_dir
from fedmerge.store.blobs import (
    BlobStream,
    fsync_path,
    open_blob_stream,
    pwrite_all,
    read_blob,
    start_writeback,
)
from fedmerge.store.card import MODEL_CARD, model_card
from fedmerge.store.errors import CorruptBlobError
from fedmerge.store.manifest import materialisable
from fedmerge.store.safetensors_format import (
    TensorSpec,
    dtype_from_name,
    encode_header,
    spec_of,
    tensor_bytes,
)

if TYPE_CHECKING:
    from fedmerge.store.manifest import Version
    from fedmerge.store.reader import StoreReader

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROVENANCE_FILE = "fedmerge-version.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"
MAX_EXPORT_WORKERS = 16  # threads copying tensors; the default is one per CPU up to this
CHUNK_BYTES = 1 << 20  # per-thread buffers: a chunk is still in cache when it is hashed, summed, written
CHUNK_ELEMENTS = CHUNK_BYTES // 8  # elements per chunk: fits a 1 MiB buffer in any dtype up to 8 bytes
WRITEBACK_BYTES = 8 << 20  # written bytes handed to the disk (start_writeback) in runs of this size
_T = TypeVar("_T")


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


def _fsync_target(target: Path | int) -> None:
    """fsync an open descriptor, or a file or directory by path."""
    if isinstance(target, int):
        os.fsync(target)
    elif target.is_dir():
        fsync_dir(target)
    else:
        fsync_path(target)


def fsync_files(paths: Sequence[Path | int]) -> None:
    """fsync every file or directory of ``paths`` (paths or open descriptors), concurrently: the
    fsyncs share the file system's journal commits, so the batch costs about one fsync's wait."""
    if len(paths) > 1:
        with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
            list(pool.map(_fsync_target, paths))
    elif paths:
        _fsync_target(paths[0])


def staging_dir(out_dir: Path) -> Path:
    """A fresh hidden sibling of ``out_dir``; refuses an ``out_dir`` that already has content."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"export target {out_dir} exists and is not empty; pick a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.partial-{secrets.token_hex(4)}"
    stage.mkdir()
    return stage


def publish(stage: Path, out_dir: Path, synced: Sequence[Path | int] = ()) -> None:
    """Make ``stage`` durable and rename it onto ``out_dir`` (an empty existing ``out_dir`` is replaced).

    ``synced``: the files inside ``stage`` still to fsync (paths or open descriptors). They and
    ``stage`` itself are fsynced in one concurrent batch — the files' bytes and the directory's
    entries are both durable before the rename — then ``out_dir.parent`` is fsynced so the rename is.
    """
    fsync_files([*synced, stage])
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(stage, out_dir)
    fsync_dir(out_dir.parent)


def export_workers(workers: int | None, tasks: int) -> int:
    """Threads an export uses: ``workers``, or ``min(os.cpu_count(), MAX_EXPORT_WORKERS)``; never
    more than ``tasks`` nor fewer than one."""
    if workers is not None and workers < 1:
        raise ConfigError(f"workers is {workers}; pass a positive number of threads, or none for the CPUs")
    n = workers if workers is not None else min(os.cpu_count() or 1, MAX_EXPORT_WORKERS)
    return max(1, min(n, tasks))


class _Parallel(Generic[_T]):
    """``fn`` over ``items`` (taken in order) on ``threads`` threads, all started before any takes an
    item: a thread's start waits until the new thread runs, which takes long once the others hold
    the GIL (a thread pool starts each thread as work is submitted). The first failure stops the
    others taking new items; :meth:`join` waits for every thread and raises it."""

    def __init__(self, fn: Callable[[_T], None], items: Iterable[_T], threads: int) -> None:
        self._fn = fn
        self._items = iter(items)
        self._lock = threading.Lock()
        self._go = threading.Event()
        self._stopped = False
        self._failure: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, name=f"export-{i}") for i in range(threads)]
        try:
            for thread in self._threads:
                thread.start()
        finally:
            self._go.set()

    def _next(self) -> tuple[bool, _T | None]:
        with self._lock:
            if self._stopped:
                return False, None
            for item in self._items:
                return True, item
            return False, None

    def _run(self) -> None:
        self._go.wait()
        while True:
            more, item = self._next()
            if not more:
                return
            try:
                self._fn(item)  # type: ignore[arg-type]  # more is True: an item
            except BaseException as exc:
                with self._lock:
                    self._stopped = True
                    if self._failure is None:
                        self._failure = exc
                return

    def cancel(self) -> None:
        """No thread takes a new item (those running finish theirs)."""
        with self._lock:
            self._stopped = True

    def join(self) -> None:
        """Wait for every thread (no thread runs ``fn`` after this); raise the first failure."""
        for thread in self._threads:
            if thread.ident is not None:
                thread.join()
        if self._failure is not None:
            raise self._failure


@dataclass(frozen=True)
class _Slot:
    """Where one planned tensor goes: open shard ``fd``, absolute byte ``offset`` of its data."""

    spec: TensorSpec
    fd: int
    offset: int


class _TensorWriter:
    """Writes θ of one tensor of a version into its :class:`_Slot`; called from several threads.

    θ = θ_root + Σ_k τ_k over the first-parent chain, summed in fp32 (fp64 stays fp64) and cast to
    the root's dtype; non-floating tensors, and every tensor of a root, are the root's stored bytes.
    This is :meth:`ModelStore.iter_materialized`'s formula with the same casts in the same order of
    additions, element by element, so the same bits. It is computed in chunks of
    :data:`CHUNK_ELEMENTS` elements: each blob of the chain is read once, sequentially, through a
    :class:`~fedmerge.store.blobs.BlobStream` (every chunk hashed as it is read), summed in per-thread
    1 MiB buffers and written at its offset with ``os.pwrite``; a stored tensor is copied straight
    from the blob's chunk buffer. Each blob's digest is checked once its last chunk has passed.
    Memory: (k + 4) MiB per thread for a chain of k deltas, whatever the tensor sizes.
    """

    def __init__(self, store: StoreReader, root: Version, deltas: list[Version]) -> None:
        self.blobs = store.blobs
        self.root = root
        self.deltas = deltas
        self.copy_bytes: int = getattr(self.blobs, "read_chunk_bytes", None) or CHUNK_BYTES
        """Bytes a stored tensor is copied by per step: the backend's ``read_chunk_bytes`` (an object
        store's blobs arrive from a socket) or :data:`CHUNK_BYTES`."""
        self._local = threading.local()

    def _buffers(self, count: int) -> list[memoryview]:
        """This thread's reusable chunk buffers (at least ``count``)."""
        bufs: list[memoryview] = getattr(self._local, "bufs", [])
        while len(bufs) < count:
            bufs.append(memoryview(bytearray(CHUNK_BYTES)))
        self._local.bufs = bufs
        return bufs

    def _what(self, version: Version, name: str) -> str:
        return f"version {version.id} tensor {name!r}"

    def write(self, slot: _Slot) -> None:
        spec = slot.spec
        name = spec.name
        sources: list[tuple[Version, TensorSpec]] = [(self.root, spec)]
        if spec.dtype.is_floating_point:
            for d in self.deltas:
                entry = d.tensors[name]
                sources.append((d, TensorSpec(name, dtype_from_name(entry.dtype), tuple(entry.shape))))
        with ExitStack() as stack:
            streams: list[BlobStream] = []
            for version, expect in sources:
                what = self._what(version, name)
                stream = open_blob_stream(self.blobs, version.tensors[name].blob, what=what, expect=expect)
                if stream is None:  # an unreadable or unexpected header: let read_blob name the fault
                    self._write_whole(slot)
                    return
                streams.append(stack.enter_context(stream))
            if len(streams) == 1:
                self._copy(slot, streams[0])
            else:
                self._sum(slot, streams)
            for stream in streams:
                stream.verify()

    def _copy(self, slot: _Slot, stream: BlobStream) -> None:
        buf = self._buffers(1)[0]
        writeback = _Writeback(slot.fd, slot.offset)
        offset = slot.offset
        step = min(CHUNK_BYTES, self.copy_bytes)
        while stream.remaining:
            view = buf[: min(stream.remaining, step)]
            stream.readinto(view)
            pwrite_all(slot.fd, view, offset)
            offset += view.nbytes
            writeback.written(offset)
        writeback.flush()

    def _sum(self, slot: _Slot, streams: list[BlobStream]) -> None:
        spec = slot.spec
        acc_dtype = accumulation_dtype(spec.dtype)
        k = len(streams)
        bufs = self._buffers(k + 3)
        acc_buf, tmp_buf, out_buf = bufs[k], bufs[k + 1], bufs[k + 2]
        numel = math.prod(spec.shape)
        out_size = spec.dtype.itemsize
        writeback = _Writeback(slot.fd, slot.offset)
        for start in range(0, numel, CHUNK_ELEMENTS):
            m = min(CHUNK_ELEMENTS, numel - start)
            parts: list[torch.Tensor] = []
            for stream, buf in zip(streams, bufs, strict=False):
                view = buf[: m * stream.spec.dtype.itemsize]
                stream.readinto(view)
                parts.append(torch.frombuffer(view, dtype=stream.spec.dtype, count=m))
            acc = torch.frombuffer(acc_buf, dtype=acc_dtype, count=m)
            acc.copy_(parts[0])  # θ_root.to(acc dtype)
            for delta in parts[1:]:
                if delta.dtype != acc_dtype:  # τ.to(acc dtype) first, as iter_materialized does
                    delta = torch.frombuffer(tmp_buf, dtype=acc_dtype, count=m).copy_(delta)
                acc += delta
            out = acc_buf
            if spec.dtype != acc_dtype:
                torch.frombuffer(out_buf, dtype=spec.dtype, count=m).copy_(acc)  # cast to the root's dtype
                out = out_buf
            offset = slot.offset + start * out_size
            pwrite_all(slot.fd, out[: m * out_size], offset)
            writeback.written(offset + m * out_size)
        writeback.flush()

    def _write_whole(self, slot: _Slot) -> None:
        """The tensor read whole with :func:`read_blob` (for blobs whose header did not stream)."""
        spec, root = slot.spec, self.root
        name = spec.name

        def read(version: Version) -> torch.Tensor:
            return read_blob(self.blobs, version.tensors[name].blob, what=self._what(version, name))

        weight = read(root)
        if spec.dtype.is_floating_point and self.deltas:
            acc = weight.to(accumulation_dtype(weight.dtype))
            for d in self.deltas:
                acc += read(d).to(acc.dtype)
            weight = acc.to(weight.dtype)
        got = spec_of(name, weight)
        if got != spec:
            raise CorruptBlobError(
                f"version {root.id} tensor {name!r}: it materialises as {got.dtype}{list(got.shape)} but "
                f"the manifest says {spec.dtype}{list(spec.shape)}; restore the manifest or blob from a "
                "backup"
            )
        pwrite_all(slot.fd, tensor_bytes(weight), slot.offset)


class _Writeback:
    """Starts the disk writeback of a slot's bytes every :data:`WRITEBACK_BYTES` as they are written
    (:func:`~fedmerge.store.blobs.start_writeback`), so the export's closing fsync has little left."""

    def __init__(self, fd: int, offset: int) -> None:
        self.fd = fd
        self.start = offset
        self.end = offset

    def written(self, end: int) -> None:
        """Bytes up to file offset ``end`` are written."""
        self.end = end
        if self.end - self.start >= WRITEBACK_BYTES:
            self.flush()

    def flush(self) -> None:
        start_writeback(self.fd, self.start, self.end - self.start)
        self.start = self.end


def export_safetensors(
    store: StoreReader,
    ref: str,
    out_dir: str | os.PathLike[str],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    workers: int | None = None,
) -> ExportResult:
    """Write version ``ref``'s materialised weights to ``out_dir`` (layout in the module docstring).

    Every shard is created at its final size with its header planned up front; each tensor's bytes
    are then written at their own offset (``os.pwrite``) by ``workers`` threads (default: one per CPU,
    at most :data:`MAX_EXPORT_WORKERS`), largest tensors first. Every blob read is verified against
    its sha256 name; a mismatch (or any other error) fails the export and removes the partial output.
    Memory: about one tensor (a root's: one 1 MiB buffer) per thread.
    """
    version = store.get(ref)
    out = Path(out_dir)
    root, deltas = materialisable(version, store.chain(version))
    specs = store.materialized_specs(version)
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(len(shards))
    threads = export_workers(workers if workers is not None else store.blobs.read_threads, len(specs))
    stage = staging_dir(out)
    fds: list[int] = []
    try:
        slots: list[_Slot] = []
        for shard, name in zip(shards, names, strict=True):
            header = encode_header(shard, {"format": "pt"})
            fd = os.open(stage / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            fds.append(fd)
            os.ftruncate(fd, len(header) + sum(s.nbytes for s in shard))
            pwrite_all(fd, header, 0)
            offset = len(header)
            for spec in shard:
                slots.append(_Slot(spec, fd, offset))
                offset += spec.nbytes
        slots.sort(key=lambda slot: -slot.spec.nbytes)  # largest first: the threads finish together
        running = _Parallel(_TensorWriter(store, root, deltas).write, slots, threads)
        try:  # the small files are written while the threads copy the tensors
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
        except BaseException:
            running.cancel()
            with contextlib.suppress(BaseException):
                running.join()  # no thread writes to a descriptor after this
            raise
        running.join()  # the first failure propagates once every thread has stopped
        publish(stage, out, [*fds, *(stage / f for f in files[len(names) :])])
    except BaseException:
        for fd in fds:
            os.close(fd)
        fds.clear()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for fd in fds:
        os.close(fd)
    return ExportResult(version=version.id, path=out, files=files, total_bytes=total)


def module_layouts(store: StoreReader, version: Any) -> dict[str, str] | None:
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
    store: StoreReader,
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
        files = sorted(p.name for p in stage.iterdir())
        publish(stage, out, [stage / f for f in files])
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
