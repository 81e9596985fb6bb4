"""The merge worker: takes queued experts in arrival order, folds them into a continual merger and
commits a version per expert (``batch_size=1``) or per batch of up to ``batch_size`` queued experts.

Versions of a track (alias ``track``, default ``continual``) have ``parents = [base, previous]``:
the delta is the whole merged task vector τ⁽ᵗ⁾ relative to the base (``parents[0]``), so every
version materialises as θ₀ + τ⁽ᵗ⁾ exactly, and ``previous`` records the lineage. The merger's state
(:meth:`ContinualMerger.state_dict`) is committed with the version.

Restart: the merger is rebuilt from the state of the version the track alias names. A crash between
the store commit and the queue update leaves rows ``queued`` whose sha256 is already among that
version's contributors; :meth:`MergeWorker.recover` marks them merged without merging them again, so
every acknowledged expert is merged exactly once. (The worker commits serially and marks a version's
rows before merging the next, so only the track's newest version can be unreconciled.)
"""

from __future__ import annotations

import json
import logging
import tarfile
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedmerge.aggregators.continual import ContinualMerger, create_continual
from fedmerge.codec import DecodeLimits, decode_package
from fedmerge.delta.lora import load_peft_adapter, lora_to_delta
from fedmerge.delta.sparse import SparseTensor
from fedmerge.errors import ConfigError, FedMergeError, InvalidSubmission
from fedmerge.service.intake import IntakeQueue, Submission
from fedmerge.store import Contributor, ModelStore, Version

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- conversion


def _complete(
    base: Mapping[str, torch.Tensor], partial: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """A task vector over every floating base tensor: ``partial`` where given, zeros elsewhere."""
    out: dict[str, torch.Tensor] = {}
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
    for name, weight in sorted(base.items()):
        if not weight.is_floating_point():
            continue
        t = partial.get(name)
        out[name] = torch.zeros(weight.shape, dtype=torch.float32) if t is None else t.to(torch.float32)
    return out


def checkpoint_to_task_vector(path: Path, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """τ = θ_ft − θ₀ over the base's floating tensors; the checkpoint must hold all of them."""
    try:
        ft = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidSubmission(
            f"checkpoint is not a readable safetensors file ({exc}); send model.safetensors"
        ) from None
    missing = [n for n, w in base.items() if w.is_floating_point() and n not in ft]
    if missing:
        raise InvalidSubmission(
            f"checkpoint lacks base tensor {missing[0]!r} ({len(missing)} missing); send the full fine-tuned "
            "state dict, or a LoRA adapter / DeltaPackage for partial updates"
        )
    partial = {}
    for n, w in base.items():
        if not w.is_floating_point():
            continue
        if not ft[n].is_floating_point():
            raise InvalidSubmission(f"checkpoint tensor {n!r} is {ft[n].dtype}, the base's is floating")
        if tuple(ft[n].shape) != tuple(w.shape):
            raise InvalidSubmission(
                f"checkpoint tensor {n!r} has shape {tuple(ft[n].shape)}, the base has {tuple(w.shape)}"
            )
        partial[n] = ft[n].to(torch.float32) - w.to(torch.float32)
    return _complete(base, partial, "checkpoint")


def peft_tar_to_task_vector(path: Path, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW = s·B·A for every LoRA module of a tarred peft adapter directory; zeros elsewhere."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with tarfile.open(path, "r:") as tar:
                names = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                for wanted in ("adapter_config.json", "adapter_model.safetensors"):
                    member = names.get(wanted)
                    if member is None:
                        raise InvalidSubmission(f"peft archive has no {wanted}; tar the adapter directory")
                    src = tar.extractfile(member)
                    assert src is not None
                    with src, open(Path(tmp) / wanted, "wb") as dst:
                        while block := src.read(1 << 20):
                            dst.write(block)
        except tarfile.TarError as exc:
            raise InvalidSubmission(f"peft expert is not an uncompressed tar archive ({exc})") from None
        try:
            adapter = load_peft_adapter(tmp)
        except ConfigError as exc:
            raise InvalidSubmission(f"peft adapter: {exc}") from None
    return _complete(base, lora_to_delta(adapter), "peft adapter")


def check_package_base(meta_id: str, meta_hash: str, base_id: str, base_hash: str) -> None:
    """Refuse a package encoded against another base: its ``base_version_id`` must equal ``base_id``
    and its ``base_version_hash`` equal ``base_hash``, each when set (an empty field is not checked, so
    a package that names no base is taken as relative to the server's base)."""
    if (meta_id and meta_id != base_id) or (meta_hash and meta_hash != base_hash):
        raise InvalidSubmission(
            f"stale delta package: computed against base {meta_id or '(no id)'!r} (hash "
            f"{meta_hash[:16] + '…' if meta_hash else '(none)'}) but this server merges onto base "
            f"{base_id!r} (hash {base_hash[:16]}…); recompute the delta against that version"
        )


def package_to_task_vector(
    path: Path,
    base: Mapping[str, torch.Tensor],
    max_bytes: int,
    *,
    base_id: str,
    base_hash: str,
) -> dict[str, torch.Tensor]:
    """Decode a verified DeltaPackage made against base ``base_id``/``base_hash`` (see
    :func:`check_package_base`); LoRA factors become ΔW = (α/r)·B·A."""
    data = path.read_bytes()
    decoded = decode_package(
        data, limits=DecodeLimits(max_package_bytes=min(max(max_bytes, 1), (1 << 31) - 1))
    )
    check_package_base(decoded.meta.base_version_id, decoded.meta.base_version_hash, base_id, base_hash)
    dense = {
        n: (t.to_dense(torch.float32) if isinstance(t, SparseTensor) else t.to(torch.float32))
        for n, t in decoded.tensors.items()
    }
    if decoded.meta.kind == "task_vector":
        return _complete(base, dense, "delta package")
    meta = decoded.meta
    if meta.lora_rank <= 0:
        raise InvalidSubmission("LoRA delta package declares lora_rank 0; set it in PackageMeta")
    scale = meta.lora_alpha / meta.lora_rank
    partial: dict[str, torch.Tensor] = {}
    for name, a in dense.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removesuffix(".lora_A.weight")
        b = dense.get(module + ".lora_B.weight")
        if b is None:
            raise InvalidSubmission(f"delta package: {name!r} has no matching {module + '.lora_B.weight'!r}")
        partial[module.removeprefix("base_model.model.") + ".weight"] = scale * (b @ a)
    return _complete(base, partial, "LoRA delta package")


def expert_task_vector(
    sub: Submission, path: Path, base: Version, weights: Mapping[str, torch.Tensor], max_bytes: int
) -> dict[str, torch.Tensor]:
    """τ of one spooled expert relative to ``base`` (whose floating tensors are ``weights``)."""
    if sub.format == "checkpoint":
        return checkpoint_to_task_vector(path, weights)
    if sub.format == "peft_tar":
        return peft_tar_to_task_vector(path, weights)
    return package_to_task_vector(path, weights, max_bytes, base_id=base.id, base_hash=base.content_hash)


# ----------------------------------------------------------------------------------- the worker


def _decode_params(value: Any) -> dict[str, Any]:
    return json.loads(json.dumps(value))  # normalise tuples etc. for comparison with a manifest


class MergeWorker:
    """Single merge thread over one store track (see the module docstring)."""

    def __init__(
        self,
        store: ModelStore,
        queue: IntakeQueue,
        *,
        method: str,
        params: Mapping[str, Any],
        batch_size: int = 1,
        base: str | None = None,
        track: str = "continual",
        max_bytes: int = 2 << 30,
    ) -> None:
        self.store = store
        self.queue = queue
        self.method = method
        self.params = dict(params)
        self.batch_size = batch_size
        self.track = track
        self.max_bytes = max_bytes
        versions = store.list()
        if not versions:
            raise ConfigError(
                f"store {store.root} has no versions; commit the base model first "
                "(fedmerge serve-continual --base-weights FILE, or ModelStore.commit_base)"
            )
        self.base: Version = store.get(base) if base else store.root_of(store.get("latest"))
        if self.base.kind != "full":
            raise ConfigError(
                f"base {base!r} is version {self.base.id} of kind {self.base.kind}; name a full-weights root"
            )
        self.base_weights = store.load_delta(self.base)
        self.merger: ContinualMerger = create_continual(method, **self.params)
        self.head: Version | None = None
        self.error: BaseException | None = None

    # -------------------------------------------------------------------------------- recovery
    def recover(self) -> None:
        """Resume the merger from the track's head and reconcile a commit the queue missed."""
        if self.track not in self.store.aliases():
            return
        head = self.store.get(self.track)
        if head.method != self.method or _decode_params(head.params) != _decode_params(self.merger.params):
            raise ConfigError(
                f"track {self.track!r} was merged with {head.method} {head.params}; "
                f"this server is configured "
                f"for {self.method} {self.merger.params} — use the same method, or another --track"
            )
        if self.store.root_of(head).id != self.base.id:
            raise ConfigError(f"track {self.track!r} descends from another base than {self.base.id}")
        state = self.store.load_state(head)
        if state is None:
            raise ConfigError(
                f"track {self.track!r} head {head.id} carries no merger state; use another --track"
            )
        self.merger.load_state_dict(state)
        self.head = head
        merged = {c.submission_hash for c in head.contributors}
        stale = [s.id for s in self.queue.queued(limit=1 << 30) if s.sha256 in merged]
        if stale:
            log.info("reconciling %d submission(s) already merged into %s", len(stale), head.id)
            self.queue.mark_merged(stale, head.id)

    # -------------------------------------------------------------------------------- merging
    def step(self) -> Version | None:
        """Merge up to ``batch_size`` queued experts and commit; None when nothing was merged."""
        batch = self.queue.queued(self.batch_size)
        if not batch:
            return None
        accepted: list[Submission] = []
        for sub in batch:
            try:
                if sub.base_version and self.store.resolve(sub.base_version) != self.base.id:
                    raise InvalidSubmission(
                        f"expert was fine-tuned from {sub.base_version!r}; this server merges experts of "
                        f"base {self.base.id} — fine-tune from that version"
                    )
                tau = expert_task_vector(
                    sub, self.queue.spool_path(sub), self.base, self.base_weights, self.max_bytes
                )
                self.merger.add_expert(tau)
                accepted.append(sub)
            except FedMergeError as exc:
                log.warning("rejected %s: %s", sub.id, exc)
                self.queue.mark_rejected(sub.id, str(exc))
            except (RuntimeError, ValueError, OSError) as exc:  # e.g. torch refusing a malformed tensor
                log.warning("rejected %s: %r", sub.id, exc)
                self.queue.mark_rejected(sub.id, f"could not be merged: {exc!r}")
        if not accepted:
            return None
        return self._commit(accepted)

    def _commit(self, subs: list[Submission]) -> Version:
        parents = [self.base.id] + ([self.head.id] if self.head is not None else [])
        version = self.store.commit(
            self.merger.merged(),
            parents=parents,
            method=self.method,
            params=self.merger.params,
            contributors=[Contributor(s.client_id, 0, s.sha256, True, None) for s in subs],
            round=self.merger.num_merged,
            metrics={},
            privacy=None,
            state=self.merger.state_dict(),
            aliases=("latest", self.track),
            metadata={
                "track": self.track,
                "submissions": [s.id for s in subs],
                "num_merged": self.merger.num_merged,
            },
        )
        self.queue.mark_merged([s.id for s in subs], version.id)
        self.head = version
        log.info("committed %s with %s", version.id, [s.id for s in subs])
        return version

    def drain(self) -> list[Version]:
        """Merge everything queued now (synchronously)."""
        out = []
        while self.queue.queued(1):
            v = self.step()
            if v is not None:
                out.append(v)
        return out

    # -------------------------------------------------------------------------------- loop
    def run(self, stop: threading.Event, idle_wait: float = 0.5) -> None:
        """Merge until ``stop`` is set; the store must have been opened in this thread (SQLite)."""
        while not stop.is_set():
            try:
                if self.step() is None and not self.queue.queued(1):
                    self.queue.wait(idle_wait)
            except Exception as exc:  # e.g. StoreBusyError: rebuild from the last committed state, retry
                log.exception("merge step failed; resuming from the track head")
                self.error = exc
                self.merger = create_continual(self.method, **self.params)
                self.head = None
                self.recover()
                stop.wait(1.0)
