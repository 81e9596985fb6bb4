"""What a run observes per case (an :class:`Outcome` row) and the store snapshots it compares."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
from fedmerge_testing.hostile.data import EntryPoint

# ------------------------------------------------------------------------------------------ outcomes


@dataclass
class Outcome:
    """What one case did at one entry point (observations only; no verdict beyond ``matches``).

    ``error``: the error the client got (gRPC ``CODE: details``) or the reason recorded for the
    submission; ``acknowledged``: the intake returned a submission id; ``merged``: the payload went
    into a version; ``serving``: a valid call succeeded right after; ``versions_unchanged``: no stored
    version changed and none was added by this case; ``crash``: an unexpected exception, an
    ``INTERNAL``/``UNKNOWN`` status, a dead server or an aborted round.
    """

    case: str
    klass: str
    entry: EntryPoint
    how: str
    sent: str
    error: str = ""
    acknowledged: bool = False
    merged: bool = False
    serving: bool = True
    versions_unchanged: bool = True
    crash: bool = False
    gap: str = ""
    expect: str = ""
    submission_id: str = ""
    seconds: float = 0.0

    @property
    def matches(self) -> bool:
        """The error matches the case's expectation."""
        return bool(self.expect) and re.search(self.expect, self.error, re.S) is not None

    @property
    def as_expected(self) -> bool:
        """The expected error, nothing merged, the server still serving, no version changed."""
        return (
            self.matches and self.serving and self.versions_unchanged and not self.merged and not self.crash
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "matches": self.matches, "as_expected": self.as_expected}


def store_snapshot(root: str | os.PathLike[str]) -> dict[str, str]:
    """Version id → ``content_hash`` + sha256 of its manifest file, plus ``@verify`` (the store's
    own re-hash of every blob and manifest) and the aliases: equal snapshots mean byte-identical
    versions."""
    from fedmerge.store import ModelStore

    out: dict[str, str] = {}
    with ModelStore.open(root) as store:
        for v in store.list():
            manifest = Path(root) / "manifests" / f"{v.id}.json"
            digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else "-"
            out[v.id] = f"{v.content_hash}/{digest}"
        out["@verify"] = "ok" if store.verify().ok else "FAILED"
        out["@aliases"] = json.dumps(store.aliases(), sort_keys=True)
    return out


def unchanged(
    before: Mapping[str, str], after: Mapping[str, str], allowed_new: set[str] | frozenset[str] = frozenset()
) -> bool:
    """Every version of ``before`` is byte-identical in ``after``, the store verifies, and no version
    was added except ``allowed_new`` (those made from valid submissions sent meanwhile)."""
    old = {k: v for k, v in before.items() if not k.startswith("@")}
    new = {k for k in after if not k.startswith("@")} - set(old)
    kept = all(after.get(k) == v for k, v in old.items())
    aliases_ok = bool(allowed_new) or before.get("@aliases") == after.get("@aliases")
    return kept and new <= set(allowed_new) and after.get("@verify") == "ok" and aliases_ok
