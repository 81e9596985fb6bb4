"""``fedmerge merge RECIPE.yaml --store DIR [--export DIR]``: run a mergekit-style recipe
(argument parsing and printing only; the work is :func:`fedmerge.recipes.run_recipe`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False)


@app.command()
def merge(
    recipe: Annotated[
        Path | None, typer.Argument(help="a mergekit YAML recipe (docs/merging.md, ## Recipes)")
    ] = None,
    store: Annotated[
        Path | None, typer.Option("--store", help="store directory", envvar="FEDMERGE_STORE")
    ] = None,
    export: Annotated[
        Path | None, typer.Option("--export", help="also write the result as a Hugging Face directory")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of stochastic methods (DARE, DELLA)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as one JSON object")] = False,
    suggest: Annotated[
        bool, typer.Option("--suggest", help="print which method to try first, and the evidence, then exit")
    ] = False,
) -> None:
    """Merge the models a mergekit recipe names and commit the result as a new store version."""
    from fedmerge.recipes import run_recipe

    if suggest:
        from fedmerge.recipes.suggest import suggestion_lines

        typer.echo("\n".join(suggestion_lines()))
        return
    if recipe is None or store is None:
        typer.echo("fedmerge merge: give a RECIPE and --store DIR (or --suggest)", err=True)
        raise typer.Exit(2)

    result = run_recipe(recipe, store, export=export, seed=seed)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), sort_keys=True))
        return
    parents = ", ".join(result.parents) or "none (a new root)"
    typer.echo(
        f"{result.method}: committed {result.version} ({result.kind}, {result.tensors} tensors; "
        f"parents {parents})"
    )
    for note in result.notes:
        typer.echo(f"note: {note}")
    if result.export:
        typer.echo(f"exported to {result.export}")
