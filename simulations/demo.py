"""``fedmerge demo``: a federation on the embedded store, end to end, in under a minute on 2 CPU cores.

It commits the task's pre-trained base into the store (if the store is empty), runs the fedmerge
ServerApp and ``num-clients`` simulated ClientApps on Flower's simulation runtime (``flwr run`` on a
private SuperLink in simulation mode; Ray) for ``rounds`` rounds — non-IID Dirichlet partitions, TIES
over top-k + int8 task vectors — and prints a table per round (clients accepted / rejected, bytes sent
vs dense fp32, accuracy), the versions and the command that opens the store's dashboard."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedmerge.flower.config import parse_run_config
from fedmerge.flower.server.commit import RoundReport
from fedmerge.flower.server.federation import ensure_base
from fedmerge.flower.simulation import ServerAppFactory, run_simulation_app
from fedmerge.store import ModelStore
from fedmerge_simulations.tasks import get_task


def round_table(report: RoundReport) -> Table:
    """One round: a row per sampled client, then the totals and the server-side accuracy."""
    title = f"round {report.round} → {report.version_id or 'not committed'} ({report.wall_s:.1f} s)"
    table = Table(title=title)
    for col in ("client", "status", "examples", "bytes sent", "vs dense", "local acc", "reason"):
        table.add_column(col)
    for o in sorted(report.outcomes, key=lambda o: o.client_id):
        ratio = f"{o.wire_bytes / o.dense_bytes:.1%}" if o.dense_bytes else "-"
        acc = o.metrics.get("test-accuracy")
        table.add_row(
            o.client_id,
            "[green]accepted" if o.accepted else "[red]rejected",
            str(o.num_examples),
            f"{o.wire_bytes:,}",
            ratio,
            "-" if acc is None else f"{acc:.3f}",
            o.reason or "",
        )
    m = report.metrics
    dense = m.get("uplink-dense-bytes", 0.0)
    table.add_section()
    table.add_row(
        "total",
        f"{len(report.accepted)} ok / {len(report.rejected)} rejected",
        "",
        f"{int(m.get('uplink-bytes', 0)):,}",
        f"{m.get('uplink-bytes', 0) / dense:.1%}" if dense else "-",
        f"server {m['server-accuracy']:.3f}" if "server-accuracy" in m else "",
        "",
    )
    return table


def versions_table(store: ModelStore) -> Table:
    table = Table(title=f"versions in {store.root}")
    for col in ("id", "kind", "method", "round", "parents", "accepted", "server acc", "aliases"):
        table.add_column(col)
    for v in reversed(store.list()):
        acc = v.metrics.get("server-accuracy")
        table.add_row(
            v.id, v.kind, v.method, "" if v.round is None else str(v.round), ",".join(v.parents),
            str(sum(c.accepted for c in v.contributors)), "" if acc is None else f"{acc:.3f}",
            ",".join(store.aliases_of(v.id)),
        )  # fmt: skip
    return table


def run_demo(
    store: Path,
    *,
    num_clients: int = 5,
    rounds: int = 3,
    overrides: dict[str, Any] | None = None,
    console: Console | None = None,
) -> list[RoundReport]:
    """Run the demo federation; returns the round reports (also printed)."""
    from fedmerge.tasks.evaluate import task_evaluator
    from fedmerge_simulations.runner import CLIENT_APP, SERVER_APP_FACTORY

    console = console or Console()
    config: dict[str, Any] = {
        "store": str(store),
        "num-rounds": rounds,
        "min-clients": num_clients,
        "min-valid": max(1, num_clients // 2),
        "local-epochs": 2,
        "lr": 0.1,
        **(overrides or {}),
    }
    cfg = parse_run_config(config)
    status = console.status(f"building the {cfg.task} base model (pre-training it on public data)…")
    status.start()
    try:
        with ModelStore.open(cfg.store) as st:
            base = ensure_base(st, lambda: get_task(cfg.task).pretrained_base(cfg.seed), name=cfg.task)
            start = task_evaluator(cfg.task, cfg.seed)(st.materialize(base.id))
            console.print(
                f"store {st.root}: starting from {base.id} (round {base.round or 0}), "
                f"server accuracy {start['accuracy']:.3f} on the global test set"
            )
        reports: list[RoundReport] = []

        def on_round(report: RoundReport) -> None:
            reports.append(report)
            console.print(round_table(report))
            if len(reports) < rounds:
                status.update(f"round {len(reports) + 1} of {rounds}: {num_clients} clients training…")

        status.update(
            f"starting Flower's simulation engine (Ray) with {num_clients} SuperNodes, "
            f"then round 1 of {rounds}…"
        )
        run_simulation_app(
            ServerAppFactory(SERVER_APP_FACTORY),
            CLIENT_APP,
            num_supernodes=num_clients,
            run_config=config,
            on_report=on_round,
        )
    finally:
        status.stop()
    with ModelStore.open(cfg.store) as st:
        console.print(versions_table(st))
    console.print(
        f"open its dashboard: {dashboard_command(Path(cfg.store))}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return reports


def dashboard_command(store: Path) -> str:
    """The one command that serves the store's web dashboard (``fedmerge dashboard``)."""
    return f"fedmerge dashboard --store {shlex.quote(str(store))}"
