"""The hostile-input corpus: bad inputs for every entry point, as data, and the runners that send them.

Each :class:`HostileCase` names a class of bad input (:data:`CLASSES`), the entry points it applies to
(``flower``: the ServerApp's reply validation, ``intake``: the gRPC ``ExpertIntake`` service), what
each entry point is expected to answer (a regular expression over the error it gives), and a function
that builds the :class:`Attack` from a :class:`Valid` submission: the payload bytes plus how to send
them (token, stream framing, stalls...). Package mutations re-sign the checksums unless the case is
about checksums, so each reaches the check it targets instead of stopping at the checksum.

The runners send every case and observe (they assert nothing):

- :func:`run_flower_direct`: each reply through :meth:`fedmerge.flower.server.judge.RoundState.judge`;
- :func:`run_flower_simulation`: one Flower simulation round, one hostile ClientApp per case beside
  honest ones; the round must commit from the honest replies;
- :func:`run_intake`: a real intake server process on localhost, one case after the other.

Every run yields :class:`Outcome` rows: the error returned, whether the server still served a valid
call, whether any stored version changed (manifest bytes and content hashes, see
:func:`store_snapshot`) and whether anything crashed. ``docs/hostile-input.md`` is their table
(``python -m bench hostile``).

The package is test support: it lives in the repository beside the tests (not in the wheel), and the
tests, the fuzzers and ``python -m bench hostile`` import it from there. By concept: :mod:`.data`
(entry points, classes, :class:`Valid`, :class:`Attack`), :mod:`.mutations` (package edits and bad
payload builders), :mod:`.corpus` (the cases), :mod:`.outcomes`, :mod:`.flower` and :mod:`.intake`
(the runners of each entry point).
"""

from __future__ import annotations

from fedmerge_testing.hostile.corpus import CASES, case, cases_for
from fedmerge_testing.hostile.data import (
    CLASSES,
    ENTRY_POINTS,
    KIB,
    MIB,
    Attack,
    Auth,
    EntryPoint,
    Framing,
    HostileCase,
    HostileRunError,
    Reply,
    Valid,
)
from fedmerge_testing.hostile.flower import (
    FLOWER_DIRECT_CONFIG,
    STYPE_WRONG,
    FlowerRound,
    HostileClientError,
    flower_content,
    flower_reply,
    flower_valid,
    hostile_client_app,
    mlp_base,
    run_flower_direct,
    run_flower_simulation,
    train_message,
)
from fedmerge_testing.hostile.intake import (
    INTAKE_LIMIT,
    INTAKE_MESSAGE_LIMIT,
    INTAKE_SERVER_ARGS,
    INTAKE_WORKERS,
    TOKEN,
    TOKENS,
    WRONG_TOKEN,
    IntakeProcess,
    Sent,
    Stall,
    channel,
    intake_valid,
    metadata,
    run_intake,
    send,
    serving,
    settle,
    submit_messages,
    summarize,
    temporary_workdir,
    tiny_base,
)
from fedmerge_testing.hostile.mutations import (
    gnu_sparse_member,
    mutate,
    resign,
    seeded_bytes,
    synthetic_delta,
)
from fedmerge_testing.hostile.outcomes import Outcome, store_snapshot, unchanged

__all__ = [
    "CASES",
    "CLASSES",
    "ENTRY_POINTS",
    "FLOWER_DIRECT_CONFIG",
    "INTAKE_LIMIT",
    "INTAKE_MESSAGE_LIMIT",
    "INTAKE_SERVER_ARGS",
    "INTAKE_WORKERS",
    "KIB",
    "MIB",
    "STYPE_WRONG",
    "TOKEN",
    "TOKENS",
    "WRONG_TOKEN",
    "Attack",
    "Auth",
    "EntryPoint",
    "FlowerRound",
    "Framing",
    "HostileCase",
    "HostileClientError",
    "HostileRunError",
    "IntakeProcess",
    "Outcome",
    "Reply",
    "Sent",
    "Stall",
    "Valid",
    "case",
    "cases_for",
    "channel",
    "flower_content",
    "flower_reply",
    "flower_valid",
    "gnu_sparse_member",
    "hostile_client_app",
    "intake_valid",
    "metadata",
    "mlp_base",
    "mutate",
    "resign",
    "run_flower_direct",
    "run_flower_simulation",
    "run_intake",
    "seeded_bytes",
    "send",
    "serving",
    "settle",
    "store_snapshot",
    "submit_messages",
    "summarize",
    "synthetic_delta",
    "temporary_workdir",
    "tiny_base",
    "train_message",
    "unchanged",
]
