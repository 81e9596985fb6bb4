"""``fedmerge simulate`` (mounted into the main CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False)


@app.command()
def simulate(
    config: Annotated[
        Path | None, typer.Argument(help="experiment recipe (TOML); default: the built-in one")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="results directory (default: results/NAME)")] = None,
) -> None:
    """Compare aggregators and codecs on simulated non-IID federations; write tables and plots.

    Finished trials are kept in OUT/trials and not recomputed when the command runs again.
    """
    from rich.console import Console

    from fedmerge_simulations.experiment import DEFAULT_CONFIG, load_config
    from fedmerge_simulations.runner import run_experiment

    cfg = load_config(config or DEFAULT_CONFIG)
    console = Console()
    summary = run_experiment(cfg, out or Path("results") / cfg.name, console)
    console.print(summary.read_text(), markup=False)
    console.print(f"report: {summary.parent}")
