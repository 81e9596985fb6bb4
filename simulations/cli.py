"""``fedmerge demo`` and ``fedmerge simulate`` (mounted into the main CLI through the ``fedmerge.commands``
entry point)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False)
SIGN_CONSENSUS = ("ties", "dare_ties", "della")  # the methods the demo's --scaling applies to


@app.command()
def demo(
    store: Annotated[Path, typer.Option(help="model store directory (created if missing)")] = Path(
        "fedmerge-store"
    ),
    clients: int = typer.Option(5, min=2, help="simulated clients (non-IID Dirichlet partitions)"),
    rounds: int = typer.Option(3, min=1, help="rounds to run (continues from the store's latest round)"),
    aggregator: str = typer.Option("ties", help="aggregator name (fedmerge.aggregators)"),
    density: float = typer.Option(0.2, help="top-k density of the client codec"),
    values: str = typer.Option("int4", help="client codec's values: fp32, fp16, bf16, int8, int4, sign"),
    downlink_density: float = typer.Option(
        0.2, help="top-k density of the update sent to clients that hold the previous version (1 = weights)"
    ),
    downlink_values: str = typer.Option("int4", help="values of the compressed downlink (as --values)"),
    rank: int = typer.Option(
        8, min=0, help="> 0: clients send weight matrices as rank-RANK factor pairs (truncated SVD); 0: top-k"
    ),
    downlink_rank: int = typer.Option(4, min=0, help="the same for the compressed downlink (as --rank)"),
    send_base: bool = typer.Option(
        False,
        "--send-base/--base-at-nodes",
        help="send every client the base weights in its first round; by default clients build the task's "
        "base themselves and the server names it by weights digest (downlink-base-at-nodes)",
    ),
    scaling: float = typer.Option(
        0.5, help="λ of the sign-consensus methods (ties, dare_ties, della): merged delta = λ · disjoint mean"
    ),
    lr: float = typer.Option(0.1, help="clients' local SGD learning rate"),
    local_epochs: int = typer.Option(2, min=1, help="clients' local epochs per round"),
    as_json: bool = typer.Option(
        False, "--json", help="print one JSON object (rounds and versions) on stdout; tables go to stderr"
    ),
) -> None:
    """Run a small federation on the embedded store and print a table per round and the versions.

    Clients send task vectors with error feedback, each weight matrix as its rank-8 factor pair with
    int4 values (the biases top-20 % int4); from round 2 on, a client that holds the previous version
    receives the update instead of the weights, its weight matrices as rank-4 pairs; packages are
    deflated. Per round, 5 clients: 9.0 kB up and 6.0 kB down, against 17 kB each way for top-20 % int4
    (``--rank 0 --downlink-rank 0``). The clients build the base themselves (the task's pretrained
    model, used only when its weights digest is the one the server names), so round 1 sends no weights
    (``--send-base`` sends them). It is the smallest point within 0.5 points of Flower's accuracy over
    20 rounds, pooled over 15 seed runs (``python -m bench frontier``, bench/RESULTS.md; rank 4 both
    ways is smaller but 0.55 points below, pooled); three rounds are too few
    to rank codecs (one run each: 0.772 with rank 4 down, 0.755 with rank 8 down, 0.777 for top-20 %
    int4)."""
    from rich.console import Console

    console = Console(stderr=as_json)
    console.print(f"fedmerge demo: {clients} simulated clients, {rounds} rounds of {aggregator} into {store}")
    with console.status("loading torch and Flower…"):
        from fedmerge_simulations.demo import run_demo

    overrides: dict[str, object] = {
        "aggregator": aggregator,
        "codec-density": density,
        "codec-values": values,
        "downlink-density": downlink_density,
        "downlink-values": downlink_values,
        "codec-rank": rank,
        "downlink-rank": downlink_rank,
        "downlink-base-at-nodes": not send_base,
        "lr": lr,
        "local-epochs": local_epochs,
    }
    if aggregator in SIGN_CONSENSUS:
        overrides["aggregator.scaling"] = scaling
    reports = run_demo(store, num_clients=clients, rounds=rounds, overrides=overrides, console=console)
    if as_json:
        import dataclasses
        import json

        from fedmerge.store import ModelStore

        with ModelStore.open(store) as st:
            versions = [json.loads(v.to_json()) | {"aliases": st.aliases_of(v.id)} for v in st.list()]
        rounds_out = [dataclasses.asdict(r) for r in reports]
        typer.echo(json.dumps({"rounds": rounds_out, "versions": versions}, default=str))
    if not reports or reports[-1].version_id is None:
        raise typer.Exit(1)


@app.command()
def simulate(
    config: Annotated[
        Path | None, typer.Argument(help="experiment recipe (TOML); default: the built-in one")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="results directory (default: results/NAME)")] = None,
    as_json: bool = typer.Option(
        False, "--json", help="print the summary rows as one JSON object on stdout; progress goes to stderr"
    ),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        help="run the clients on this existing Ray cluster (HOST:PORT of `ray start --head`, or 'auto') "
        "instead of starting a local Ray per trial",
    ),
) -> None:
    """Compare aggregators and codecs on simulated non-IID federations; write tables and plots.

    Finished trials are kept in OUT/trials and not recomputed when the command runs again.
    """
    from rich.console import Console

    from fedmerge_simulations.experiment import DEFAULT_CONFIG, load_config
    from fedmerge_simulations.runner import run_experiment

    cfg = load_config(config or DEFAULT_CONFIG)
    console = Console(stderr=as_json)
    summary = run_experiment(cfg, out or Path("results") / cfg.name, console, ray_address=ray_address)
    console.print(summary.read_text(), markup=False)
    console.print(f"report: {summary.parent}")
    if as_json:
        import json

        from fedmerge_simulations.report import summary_rows

        results = json.loads((summary.parent / "results.json").read_text())
        typer.echo(json.dumps({"report": str(summary.parent), "summary": summary_rows(results)}, default=str))
