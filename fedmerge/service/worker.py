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
import sqlite3
import threading
from collections.abc import Mapping
from typing import Any

import torch

from fedmerge.aggregators.continual import ContinualMerger, create_continual
from fedmerge.delta.rules import NonFiniteMerge, first_nonfinite
from fedmerge.errors import ConfigError, FedMergeError, InvalidSubmission, StoreIntegrityError
from fedmerge.metrics import FedmergeMetrics
from fedmerge.service.intake import IntakeQueue, Submission
from fedmerge.store import Contributor, ModelStore, StoreBusyError, UnknownVersionError, Version
from fedmerge.store.s3_client import ObjectStoreError
from fedmerge.submission import (  # noqa: F401 (re-exported: the worker's former home of these)
    _complete,
    check_package_base,
    checkpoint_to_task_vector,
    expert_task_vector,
    package_to_task_vector,
    peft_tar_to_task_vector,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- the worker


# Failures of the store (or the queue database) itself: the merge worker stops, rebuilds its merger
# from the track's head and retries the same experts. Every other exception raised while turning one
# acknowledged expert into a merge is that expert's: it is rejected or failed and the worker moves on.
# (An OSError while converting an expert — reading its spool file, extracting its archive into a
# temporary directory — is the expert's; an OSError from the store's commit is the store's.)
STORE_FAILURES: tuple[type[BaseException], ...] = (
    StoreBusyError,
    StoreIntegrityError,
    sqlite3.Error,
    ObjectStoreError,  # the object store unreachable (after botocore's retries) while reading the spool
)
COMMIT_FAILURES: tuple[type[BaseException], ...] = (*STORE_FAILURES, OSError)

MAX_REASON_CHARS = 2000


def _max_abs(tau: Mapping[str, torch.Tensor] | None) -> str:
    if not tau:
        return "unknown"
    try:
        return f"{max(float(t.abs().max()) for t in tau.values() if t.numel()):.3g}"
    except (RuntimeError, ValueError):
        return "unknown"


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _decode_params(value: Any) -> dict[str, Any]:
    return json.loads(json.dumps(value))  # normalise tuples etc. for comparison with a manifest


class MergeWorker:
    """Single merge thread over one store track (see the module docstring).

    Contract of :meth:`step` (the worker cannot wedge on an expert):

    * an expert that is invalid (any :class:`~fedmerge.errors.FedMergeError` while converting or
      folding it in, including a merged result that would not be finite) ends ``rejected`` with the
      reason;
    * any other exception while converting or folding it in (``KeyError``, ``TypeError``,
      ``SafetensorError``, ``MemoryError``, ``RuntimeError``, ...) ends it ``failed`` — a dead letter
      holding the exception — and the worker moves on;
    * an expert whose merge began ``max_attempts`` times without ending (the process died while
      merging it) ends ``failed`` without another try;
    * in every one of these cases the merger's state is restored to what it was before the expert
      was added: a continual merger never absorbs a rejected expert;
    * only failures of the store or queue database (:data:`STORE_FAILURES`, e.g.
      :class:`~fedmerge.store.StoreBusyError`, ``sqlite3.Error``, ``OSError`` from a commit) escape
      ``step``; :meth:`run` then rebuilds the merger from the track's head and retries.
    """

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
        max_attempts: int = 3,
        metrics: FedmergeMetrics | None = None,
    ) -> None:
        """``metrics``: counts each expert's final state, merge latencies and commits (None: off)."""
        self.store = store
        self.metrics = metrics
        self.queue = queue
        self.method = method
        self.params = dict(params)
        self.batch_size = batch_size
        self.track = track
        self.max_bytes = max_bytes
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be ≥ 1, got {max_attempts}")
        self.max_attempts = max_attempts
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
    def _batch(self) -> list[Submission]:
        """The next experts to merge: up to ``batch_size``, but an expert whose merge was already
        begun (the process died meanwhile) alone, so a poison expert takes no innocent one with it."""
        batch = self.queue.queued(self.batch_size)
        if not batch or batch[0].attempts > 0:
            return batch[:1]
        fresh = []
        for sub in batch:
            if sub.attempts > 0:
                break
            fresh.append(sub)
        return fresh

    def _check_base(self, sub: Submission) -> None:
        """Refuse an expert whose header names another base (store failures propagate)."""
        if not sub.base_version:
            return
        try:
            resolved = self.store.resolve(sub.base_version)
        except UnknownVersionError as exc:
            raise InvalidSubmission(
                f"expert was fine-tuned from {sub.base_version!r}: {exc}; this server merges experts of "
                f"base {self.base.id}"
            ) from None
        if resolved != self.base.id:
            raise InvalidSubmission(
                f"expert was fine-tuned from {sub.base_version!r}; this server merges experts of "
                f"base {self.base.id} — fine-tune from that version"
            )

    def _fold_in(self, sub: Submission) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Convert ``sub`` and add it to the merger; returns (merged τ, merger state) after it.

        Raises :class:`NonFiniteMerge` (state NOT yet restored; the caller restores it) when the
        merged result or the state would hold NaN/inf."""
        tau = expert_task_vector(sub, self.queue.spooled(sub), self.base, self.base_weights, self.max_bytes)
        merged = self.merger.add_expert(tau)
        state = self.merger.state_dict()
        bad = first_nonfinite(merged)
        where = "merged task vector"
        if bad is None:
            bad, where = first_nonfinite(state), "merger state"
        if bad is not None:
            raise NonFiniteMerge(
                f"merging this expert with {self.method} makes the {where} tensor {bad!r} non-finite "
                f"(NaN or inf; the expert's largest |value| is {_max_abs(tau)}); it was not merged and "
                "the merger's state is as before it — send a task vector of ordinary magnitude"
            )
        return merged, state

    def _try(
        self, sub: Submission, snapshot: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """Fold ``sub`` in; on any failure but the store's, record its final state, restore the merger
        to ``snapshot`` and return None."""
        attempts = self.queue.begin_attempt(sub.id)
        if attempts > self.max_attempts:
            reason = (
                f"the server stopped {attempts - 1} times while merging this expert (out of memory or "
                f"a crash); set aside after {self.max_attempts} attempts — check its size and contents"
            )
            log.warning("failed %s: %s", sub.id, reason)
            self.queue.mark_failed(sub.id, reason)
            self._count("failed")
            return None
        try:
            self._check_base(sub)
            return self._fold_in(sub)
        except STORE_FAILURES:
            raise
        except FedMergeError as exc:
            self._restore(snapshot)
            log.warning("rejected %s: %s", sub.id, exc)
            self.queue.mark_rejected(sub.id, _clip(str(exc)))
            self._count("rejected")
            return None
        except Exception as exc:  # the contract: anything else is this expert's failure
            self._restore(snapshot)
            self._failed(sub, exc)
            return None

    def _failed(self, sub: Submission, exc: BaseException) -> None:
        reason = _clip(
            f"could not be merged: {type(exc).__name__}: {exc} — set aside as failed (nothing of it was "
            "merged); check that the expert matches its declared format and the server's base model"
        )
        log.warning("failed %s: %r", sub.id, exc, exc_info=not isinstance(exc, MemoryError))
        self.queue.mark_failed(sub.id, reason)
        self._count("failed")

    def _count(self, outcome: str, sub: Submission | None = None) -> None:
        if self.metrics is not None:
            self.metrics.submission_finished(outcome, sub.created_at if sub is not None else None)

    def _restore(self, snapshot: Mapping[str, torch.Tensor]) -> None:
        """Put the merger back to ``snapshot`` (its :meth:`state_dict` before the failed expert)."""
        self.merger.load_state_dict(snapshot)

    def step(self) -> Version | None:
        """Merge up to ``batch_size`` queued experts and commit; None when nothing was merged.

        Every expert taken ends merged, rejected or failed (see the class docstring); only store
        failures raise."""
        batch = self._batch()
        if not batch:
            return None
        snapshot = self.merger.state_dict()
        before_batch = snapshot
        accepted: list[Submission] = []
        merged: dict[str, torch.Tensor] | None = None
        for sub in batch:
            result = self._try(sub, snapshot)
            if result is not None:
                merged, snapshot = result
                accepted.append(sub)
        if not accepted or merged is None:
            return None
        return self._commit(accepted, merged, snapshot, before_batch)

    def _commit(
        self,
        subs: list[Submission],
        merged: Mapping[str, torch.Tensor],
        state: Mapping[str, torch.Tensor],
        before: Mapping[str, torch.Tensor],
    ) -> Version | None:
        """Commit ``merged``/``state`` (both checked finite) as the track's next version.

        A store failure (:data:`COMMIT_FAILURES`) propagates: the experts stay queued and :meth:`run`
        recovers. Any other refusal of the commit marks ``subs`` failed, restores the merger to
        ``before`` and returns None."""
        parents = [self.base.id] + ([self.head.id] if self.head is not None else [])
        try:
            version = self.store.commit(
                dict(merged),
                parents=parents,
                method=self.method,
                params=self.merger.params,
                contributors=[Contributor(s.client_id, 0, s.sha256, True, None) for s in subs],
                round=self.merger.num_merged,
                metrics={},
                privacy=None,
                state=dict(state),
                aliases=("latest", self.track),
                metadata={
                    "track": self.track,
                    "submissions": [s.id for s in subs],
                    "num_merged": self.merger.num_merged,
                },
            )
        except COMMIT_FAILURES:
            raise
        except Exception as exc:  # the store refused this content: set it aside
            self._restore(before)
            for sub in subs:
                self._failed(sub, exc)
            return None
        self.queue.mark_merged([s.id for s in subs], version.id)
        self.head = version
        if self.metrics is not None:
            self.metrics.committed(version.id, version.round)
            for sub in subs:
                self._count("merged", sub)
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
    def run(self, stop: threading.Event, idle_wait: float = 0.5, max_backoff: float = 30.0) -> None:
        """Merge until ``stop`` is set; the store must have been opened in this thread (SQLite).

        A store failure (the only kind :meth:`step` raises) is logged and kept in :attr:`error`; the
        worker then waits (1 s, doubling up to ``max_backoff``), rebuilds the merger from the track's
        head and retries, for as long as it takes — it never stops merging because of one expert."""
        backoff = 0.0
        while not stop.is_set():
            try:
                if backoff:
                    self.merger = create_continual(self.method, **self.params)
                    self.head = None
                    self.recover()
                if self.step() is None and not self.queue.queued(1):
                    self.queue.wait(idle_wait)
                backoff = 0.0
            except Exception as exc:  # a store failure: rebuild from the last committed state, retry
                log.exception("merge step failed; resuming from the track head")
                self.error = exc
                backoff = min(max(1.0, 2 * backoff), max_backoff)
                stop.wait(backoff)
