"""``fedmerge bench NAME [--quick]`` (mounted into the main CLI through the ``fedmerge.commands``
entry point)."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False)


@app.command()
def bench(
    name: str = typer.Argument(..., help="benchmark name, e.g. aggregators, codec, store"),
    quick: bool = typer.Option(False, "--quick", help="the ~1 minute variant"),
) -> None:
    """Run ``python -m bench NAME [--quick]``."""
    from fedmerge_bench.__main__ import main as bench_main

    raise typer.Exit(bench_main([name, *(["--quick"] if quick else [])]))
