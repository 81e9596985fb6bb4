"""The ``fedmerge`` command line. It only parses arguments and prints; every command calls library code.

Sub-commands are contributed by the package that owns them (``fedmerge/*/cli.py``) and mounted here.
"""

from __future__ import annotations

import importlib

import typer

from fedmerge import __version__

app = typer.Typer(
    name="fedmerge",
    help="Federated and continual model merging: Flower rounds, expert intake, versioned model store.",
    no_args_is_help=True,
    add_completion=False,
)

# (module, attribute, how it is mounted): "group" mounts a Typer as `fedmerge NAME ...`,
# "commands" copies its commands to the top level (`fedmerge demo`, `fedmerge serve`).
_SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("fedmerge.store.cli", "store", "group"),
    ("fedmerge.flower.cli", "", "commands"),
    ("fedmerge.service.cli", "", "commands"),
    ("simulations.cli", "", "commands"),
]


@app.command()
def version() -> None:
    """Print the fedmerge version and the wire-format version."""
    from fedmerge import FORMAT_VERSION

    typer.echo(f"fedmerge {__version__} (format {FORMAT_VERSION})")


@app.command()
def bench(
    name: str = typer.Argument(..., help="benchmark name, e.g. aggregators, codec, store"),
    quick: bool = typer.Option(False, "--quick", help="the ~1 minute variant"),
) -> None:
    """Run ``python -m bench NAME [--quick]``."""
    from fedmerge_bench.__main__ import main as bench_main

    raise typer.Exit(bench_main([name, *(["--quick"] if quick else [])]))


def _mount() -> None:
    for module_name, group, how in _SUBCOMMANDS:
        sub: typer.Typer = importlib.import_module(module_name).app
        if how == "group":
            app.add_typer(sub, name=group)
        else:
            app.registered_commands.extend(sub.registered_commands)


_mount()


def main() -> None:
    app(prog_name="fedmerge")


if __name__ == "__main__":
    main()
