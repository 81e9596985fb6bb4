"""``python -m bench hostile [--quick] [--write-docs]``: the hostile-input corpus
(``fedmerge_testing/hostile/``) against both entry points; ``--write-docs`` rewrites
``docs/hostile-input.md``, its table (one row per case × entry point; ``--out PATH`` writes it
elsewhere).

- Flower: one simulation round (Flower's simulation engine, Ray) with one hostile ClientApp per case
  beside two synthetic honest clients and one real training client (skipped by ``--quick``), and every
  case's reply through ``RoundState.judge`` directly after two honest replies;
- intake: one ``serve-continual`` process on localhost, the whole corpus over gRPC, one case after the
  other, between two valid experts.

Reference measured in the same run: the time to handle a valid submission at the same entry point
(``judge`` of an honest reply; an intake submission from the first byte to merged). Ratios printed:
the time to refuse each hostile input over it (median and max), so a refusal that costs more than an
acceptance shows. The last line printed is one JSON object with ``cases``, ``crashes``,
``changed_versions`` and ``lost_acknowledged`` (plus ``not_serving``; ``unexpected``: rows not as
expected without a known gap; ``known_gaps``: rows not as expected because of a documented missing
defence; and the ratios).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmerge_testing.hostile import (
    CASES,
    CLASSES,
    INTAKE_LIMIT,
    INTAKE_MESSAGE_LIMIT,
    INTAKE_WORKERS,
    Outcome,
    run_flower_direct,
    run_flower_simulation,
    run_intake,
    summarize,
    temporary_workdir,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "hostile-input.md"
CELL = 150  # characters of an error message kept in the table


JUDGE_CHECKS = (
    "*What `judge` checks, in order, and why a reply can never crash a round*: every step below runs "
    "inside `RoundState.judge`; any failure — including an unexpected exception class — is a recorded "
    "rejection of that reply (`MalformedReply: …` for the unexpected ones), so the round commits its "
    "honest replies whatever one client sends (`tests/flower/test_judge.py`). Packages: size ≤ "
    "`max-package-bytes`; headers only (`fedmerge.codec.read_headers`, limits derived from the base: "
    "tensor count, per-tensor and total entries, package bytes = `2·(8·Σnumel + 2048·tensors) + 64 "
    "KiB`); base id **and** hash must both be set and equal the round's base — the message names the "
    "expected and received hashes (one policy with the intake, "
    "`fedmerge.submission.check_package_base`); kind `task_vector`; names/shapes against the "
    "base before any payload is decoded; round; `1 ≤ num_examples ≤ max-num-examples`; values within "
    "the magnitude bound. Dense interop replies (full weights under one ArrayRecord): `num-examples` "
    "must be an integer (NaN, ±inf, negative, fractional, lists, missing are refused with a message "
    "saying what was sent); each Array's `.npy` header is parsed and compared with the base's shape "
    "and a floating dtype before any element is read (a header declaring `(10**11,)` is refused "
    "without allocating); payload length must equal `numel × itemsize`. Completeness: partial task "
    "vectors are allowed in rounds and intake alike — a missing tensor is *zero change* (folded as an "
    "empty sparse tensor); an empty package is refused. Magnitude: `|x| ≤ B = min(FP32_MAX/(4·W), "
    "sqrt(FP32_MAX/(4·P)))` (`fedmerge.submission.value_bound`, W = max-num-examples × 2¹⁶ in "
    "rounds, 1 for continual mergers, P = base entries) — a package of 3e38 values is "
    "`ValueOutOfBounds`. Before commit the merged result is checked finite "
    "(`fedmerge.flower.server.commit.finite_merge`); if it is not, each accepted reply is merged alone, the "
    "offenders are recorded `NonFiniteMerge` and the rest are re-merged — the round is not lost. "
    "Continual mergers (OPCM …) apply the same bound and restore their state if an expert would make "
    "the merge non-finite. "
).rstrip()
"""How the Flower path judges a reply (rendered under *What is run*)."""

INTAKE_REPRODUCTIONS = """\
## Hostile input that once got through (the classes it added)

Corpus classes: *magnitude* (`huge-values`, `huge-values-dense`: all values 3e38, refused by the
magnitude bound), *metrics* (`dense-num-examples-*`), *completeness* (`no-tensors`, `lora-b-only`,
`lora-task-vector-names`), *merge failure* (`peft-config-empty-object`, `peft-config-json-list`,
`peft-lora-alpha-object`, `peft-weights-not-safetensors`: acknowledged, then rejected with the field
named; before the fix each wedged the merge worker for every client, also after a restart),
*expansion* (`coo-one-entry-2^28`, `seeded-randomk-2^28`: ~200-byte packages declaring shape [2^28],
refused on the declared size against the base before anything is allocated;
`peft-sparse-member-1GiB`: a 3 KiB peft tar whose weights are a GNU sparse member declaring 1 GiB,
refused on the member's type without writing anything), plus `npy-huge-header` (huge sizes),
`lora-rank-mismatch` (shapes; the message names the module and both ranks) and `bulk-sha-mismatch`
(checksum: refused, both hashes named).

Every reproduction is also run against a fresh `fedmerge serve-continual` process by
`tests/hostile/test_intake_reproductions.py`: each is refused with its message, leaves every stored
version byte-identical, keeps the server's peak RSS (`VmHWM`) and its disk use (`TMPDIR`, data
directory and store, by allocated blocks) within 16 MiB of the payload's size, and a valid expert
sent right after it is merged; the worker restarts twice with set-aside submissions in its queue and
keeps merging. Measured: 0–40 KiB of peak-RSS growth and ≤ 60 KiB of disk per reproduction; with the
decoder called without the base's shapes, the [2^28] package costs +1 GiB (the test then fails).
Numbers in `bench/RESULTS.md` (*intake reproductions*). Other regression tests:
`tests/service/test_worker_dead_letter.py` (30+ malformed adapters/checkpoints/packages interleaved
with valid ones across a restart; dead letter; attempts; batch rollback),
`tests/service/test_intake_promises.py` (bulk hash, per-client partial uploads, `GetSubmission`
disclosure, empty chunk), `tests/flower/test_judge.py`.
"""
"""The intake-reproductions section of the document (its classes and regression tests)."""


def _cell(text: str, limit: int = CELL) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def _ratios(outcomes: Sequence[Outcome], reference_s: float) -> dict[str, float]:
    times = [o.seconds for o in outcomes if o.seconds > 0]
    if not times or reference_s <= 0:
        return {}
    return {"median": statistics.median(times) / reference_s, "max": max(times) / reference_s}


def render(rows: Sequence[Outcome], totals: dict[str, Any], command: str, notes: dict[str, Any]) -> str:
    """The Markdown of ``docs/hostile-input.md``."""
    order = {name: i for i, name in enumerate(CLASSES)}
    case_order = {c.name: i for i, c in enumerate(CASES)}
    rows = sorted(rows, key=lambda o: (order[o.klass], case_order[o.case], o.entry))
    shown = {(o.entry, o.case) for o in rows if o.gap and not o.as_expected}
    gaps = [(e, c.name, c.gaps[e]) for c in CASES for e in c.entry_points if e in c.gaps]
    lines = [
        "# Hostile input: every entry point against a corpus of bad inputs",
        "",
        f"Produced by `{command}` (the table below is rewritten by every run; do not edit it by hand).",
        "The corpus is `fedmerge_testing/hostile/` (`CASES`); the tests that hold these results are",
        "`tests/hostile/` (`test_flower_path.py`, `test_intake.py`, `test_corpus.py`).",
        "",
        "```json",
        json.dumps(totals, indent=None, sort_keys=True),
        "```",
        "",
        "## What is run",
        "",
        "- **flower**: the ServerApp's reply validation (`flower/server/judge.py`, `RoundState.judge`). "
        + (
            "`simulation`: one Flower simulation round (Ray) in which each case is one hostile ClientApp "
            f"beside {notes.get('honest', 3)} honest ones (two synthetic, one really training on digits); "
            "*serving* = the round still committed a version from the honest replies; *versions unchanged* "
            "= the earlier version's manifest and blobs are byte-identical afterwards (and the hostile "
            "reply is not among the accepted). "
            if notes.get("simulation")
            else ""
        )
        + "`direct`: the reply handed to `RoundState.judge` after two honest replies; the round's merge "
        "must equal, bit for bit, the merge of the two honest replies alone "
        f"(here: {'yes' if notes.get('merged_equal') else '**no**'})."
        + (
            ""
            if notes.get("simulation")
            else " `slow-loris` needs a round deadline, so it runs in the simulation only (without --quick)."
        ),
        "  " + JUDGE_CHECKS,
        "- **intake**: a real `serve-continual` process on localhost (bearer tokens, "
        f"`--max-submission-bytes {INTAKE_LIMIT}`, `--max-message-bytes {INTAKE_MESSAGE_LIMIT}`, "
        f"`--max-workers {INTAKE_WORKERS}`, `--stream-idle-timeout-s 1`, merger `opcm`), one case after "
        "the other between two valid "
        "experts. The error is the gRPC status and message the client got, or — for content the server "
        "acknowledged (it spools before it decodes) — the reason the merge worker recorded when it "
        "rejected the submission (`GetSubmission`). *serving* = a valid `ListVersions` answered right "
        "after the case (for the stalls: a valid expert and a `ListVersions` sent *while* the streams "
        "were stalled); *versions unchanged* = every stored version's manifest hash and content hash "
        "equal before/after, `store.verify()` clean, and no version added by the case.",
        "",
        "A crash is an exception out of the validation code, an `INTERNAL`/`UNKNOWN` status, a dead "
        "server or an aborted round. *Lost acknowledged* counts submissions the intake acknowledged that "
        "ended neither merged nor rejected with a reason (every acknowledged id is polled at the end, "
        "the valid ones included).",
        "",
        "## Defences missing (known gaps)",
        "",
    ]
    if not gaps:
        lines.append("None: every case got its expected answer.")
    for entry, name, gap in gaps:
        seen = "shown in this run" if (entry, name) in shown else "not shown in this run: order-dependent"
        lines.append(f"- `{name}` ({entry}; {seen}): {gap}.")
    lines += [
        "",
        "A gap is an `xfail(strict=True)` test in `tests/hostile/` that starts passing, and must be "
        "un-marked, when the defence lands.",
        "",
        "## Results",
        "",
        "| class | case | entry point | how | what was sent | error returned | serving | versions "
        "unchanged | as expected |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in rows:
        lines.append(
            f"| {o.klass} | `{o.case}` | {o.entry} | {o.how} | {_cell(o.sent, 90)} | {_cell(o.error)} "
            f"| {_yes(o.serving)} | {_yes(o.versions_unchanged)} | "
            f"{'yes' if o.as_expected else ('gap' if o.gap else '**no**')}{' · crash' if o.crash else ''} |"
        )
    lines += ["", *INTAKE_REPRODUCTIONS.splitlines()]
    lines += [
        "",
        "## Fuzzing",
        "",
        "- Decoder: `tests/codec/test_fuzz.py` (hypothesis: random, mutated, truncated and re-signed "
        "packages; the decoder may only return or raise a `PackageError`).",
        "- Flower reply validation: `tests/hostile/test_flower_path.py::test_fuzzed_replies_are_judged_"
        "never_raise` (hypothesis, 150 examples: random bytes, byte edits, truncations and re-signed "
        "field/payload mutations in the package slot; `judge` returns, a rejection names its error class, "
        "an acceptance only for a package that decodes against the base).",
        "- Intake: `tests/hostile/test_intake.py::test_fuzzed_submit_streams_get_clear_answers_and_the_"
        "server_keeps_serving` (hypothesis, 120 streams against a server process: random header fields, "
        "framing, tokens and bytes; only `OK`, `INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`, "
        "`FAILED_PRECONDITION` or `NOT_FOUND` with a message, every acknowledged submission ends "
        "merged or rejected with a reason, earlier versions "
        "byte-identical, a valid expert merged afterwards).",
        "- Decoder, coverage-guided: `fuzz/decode_package.py` (atheris/libFuzzer from valid seed "
        "packages; each mutant that still parses is re-signed so it reaches the checks behind the "
        "checksums); `tests/codec/test_atheris.py` runs it for 60 s in the slow suite. The hypothesis "
        "fuzzers above run in the default suite within a few seconds each, derandomized "
        "(`HYPOTHESIS_PROFILE=explore` draws new examples).",
        "",
        "## Other observations",
        "",
        "- The intake deduplicates by content only: bytes already submitted get the earlier "
        "submission back (`duplicate`), whatever the new header says. A client that sent an expert "
        "with a wrong format or base version cannot resubmit the same bytes corrected, and anyone who "
        "obtains an expert's bytes before its owner submits them can submit them first under a wrong "
        "format, so that the owner's submission is answered with the earlier, rejected one.",
        "- A client may have at most `limits.max_concurrent_streams` (4) SubmitExpert/Upload streams "
        "open; more are refused with `RESOURCE_EXHAUSTED`, and streams silent for "
        "`stream_idle_timeout_s` are dropped with `DEADLINE_EXCEEDED`. Many *distinct* clients "
        "stalling at once can still fill the handler pool for up to the idle timeout.",
        "- Flower path, wrong or missing authentication: a SuperNode whose key is not registered is "
        "refused by the SuperLink (`tests/flower/test_serve.py`). Inside a round, identity is the "
        "Flower node: a package that claims a peer's client id is judged on its own merits and "
        "recorded as `ID@node-N`, so it cannot get the peer rejected (`tests/hostile/test_flower_path.py"
        "::test_an_impostor_replying_first_does_not_get_the_honest_client_rejected`).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench hostile")
    parser.add_argument("--quick", action="store_true", help="skip the Flower simulation (direct judge only)")
    parser.add_argument("--write-docs", action="store_true", help=f"write the Markdown table to {DOC.name}")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table there instead")
    parser.add_argument("--deadline-s", type=float, default=60.0, help="simulation round deadline")
    parser.add_argument("--stall-s", type=float, default=3.0, help="how long the intake stalls are watched")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    work = temporary_workdir()
    notes: dict[str, Any] = {}
    try:
        direct, direct_info = run_flower_direct(work / "direct")
        notes["merged_equal"] = direct_info["merged_equal"]
        flower = direct
        if not args.quick:
            simulated, sim_info = run_flower_simulation(work / "simulation", deadline_s=args.deadline_s)
            notes.update(simulation=True, honest=len(sim_info["honest_partitions"]))
            flower = simulated
            print(
                f"flower simulation: committed {sim_info['committed']}, accepted {sim_info['accepted']}, "
                f"{sim_info['wall_s']:.1f} s"
            )
        intake, intake_info = run_intake(work / "intake", stall_s=args.stall_s)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = [o for o in (*flower, *intake) if o.how != "simulation only"]
    lost = len(intake_info["lost_acknowledged"])
    totals: dict[str, Any] = summarize(rows, lost)
    flower_ratio = _ratios([o for o in direct if o.how == "direct"], direct_info["reference_s"])
    intake_ratio = _ratios(intake, intake_info["reference_s"])
    print(
        f"flower judge: valid reply {1e3 * direct_info['reference_s']:.2f} ms; refusal / valid: "
        f"median {flower_ratio.get('median', 0):.2f}, max {flower_ratio.get('max', 0):.2f}"
    )
    print(
        f"intake: valid expert submitted → merged {intake_info['reference_s']:.2f} s; refusal / valid: "
        f"median {intake_ratio.get('median', 0):.2f}, max {intake_ratio.get('max', 0):.2f}"
    )
    for o in rows:
        if not o.as_expected:
            print(f"  {o.entry:6s} {o.case:26s} {'gap' if o.gap else 'UNEXPECTED'}: {_cell(o.error, 110)}")
    command = "python -m bench hostile" + (" --quick" if args.quick else "")
    if args.deadline_s != parser.get_default("deadline_s"):
        command += f" --deadline-s {args.deadline_s:g}"  # a loaded machine needs a longer round
    out = args.out if args.out is not None else (DOC if args.write_docs else None)
    if out is not None:  # the tracked table only when asked (--write-docs)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(rows, totals, command + (" --write-docs" if out == DOC else ""), notes))
        print(f"wrote {out} ({len(rows)} rows)", file=sys.stderr)
    result = {
        "benchmark": "hostile",
        "quick": args.quick,
        **totals,
        "flower_refusal_vs_valid": flower_ratio,
        "intake_refusal_vs_valid": intake_ratio,
        "intake_valid_after_corpus": intake_info["valid_after_corpus"],
        "flower_merge_equal_to_honest_only": direct_info["merged_equal"],
        "wall_s": time.perf_counter() - t0,
    }
    print(json.dumps(result))
    return 0
