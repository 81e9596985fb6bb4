"""The ``fedmerge`` command line. It only parses arguments and prints; every command calls library code.

Sub-commands are contributed by the package that owns them and mounted here: the library's own
(``fedmerge/*/cli.py``) by name, the applications' (``fedmerge demo``, ``simulate``, ``bench``) through the
``fedmerge.commands`` entry-point group, so the library never imports an application. An application
whose optional dependencies are not installed (a server-only install) is reported when its command is
asked for, never at start-up.

Errors: a :class:`~fedmerge.errors.FedMergeError` (or a missing file) is one line on stderr and exit
code 2; ``--debug`` (anywhere on the line, or ``FEDMERGE_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import entry_points

import typer

from fedmerge import FORMAT_VERSION, __version__
from fedmerge.errors import FedMergeError

ENTRY_POINT_GROUP = "fedmerge.commands"

app = typer.Typer(
    name="fedmerge",
    help="Federated and continual model merging: Flower rounds, expert intake, versioned model store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    suggest_commands=False,  # click already suggests; typer's own would repeat it
)

# (module, attribute, how it is mounted): "group" mounts a Typer as `fedmerge NAME ...`,
# "commands" copies its commands to the top level (`fedmerge serve`, `fedmerge serve-continual`).
_LIBRARY_COMMANDS: list[tuple[str, str, str]] = [
    ("fedmerge.store.cli", "store", "group"),
    ("fedmerge.flower.cli", "", "commands"),
    ("fedmerge.service.cli", "", "commands"),
    ("fedmerge.recipes_cli", "", "commands"),  # fedmerge merge RECIPE.yaml
    ("fedmerge.dashboard.cli", "", "commands"),  # fedmerge dashboard (web deps imported when run)
]
# entry point name → why it could not be loaded (a missing optional dependency)
_UNAVAILABLE: dict[str, str] = {}


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fedmerge {__version__} (format {FORMAT_VERSION})")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="print the version and exit"
    ),
    debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error"),
) -> None:
    """Federated and continual model merging: Flower rounds, expert intake, versioned model store."""


@app.command()
def version() -> None:
    """Print the fedmerge version and the wire-format version."""
    typer.echo(f"fedmerge {__version__} (format {FORMAT_VERSION})")


def _mount(sub: typer.Typer, group: str, how: str) -> None:
    if how == "group":
        app.add_typer(sub, name=group)
    else:
        app.registered_commands.extend(sub.registered_commands)


def _mount_all() -> None:
    for module_name, group, how in _LIBRARY_COMMANDS:
        _mount(importlib.import_module(module_name).app, group, how)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            sub = ep.load()
        except ImportError as exc:  # an application whose extra is not installed
            _UNAVAILABLE[ep.name] = f"{exc} (install fedmerge[sim] or fedmerge[bench])"
            continue
        _mount(sub, "", "commands")


_mount_all()
app.command("init")(
    importlib.import_module("fedmerge.store.cli").init
)  # `fedmerge init` = `fedmerge store init`


def _fail(message: str) -> None:
    print(f"fedmerge: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; errors meant for the user are one line on stderr and a non-zero exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("FEDMERGE_DEBUG") == "1"
    if "--debug" in args:
        args.remove("--debug")
    known = {c.name or getattr(c.callback, "__name__", "").replace("_", "-") for c in app.registered_commands}
    known |= {g.name or "" for g in app.registered_groups}
    if args and not args[0].startswith("-") and args[0] not in known and _UNAVAILABLE:
        why = "; ".join(f"{name}: {reason}" for name, reason in _UNAVAILABLE.items())
        _fail(f"no command {args[0]!r} in this install ({why})")
        sys.exit(2)
    try:
        app(args=args, prog_name="fedmerge")
    except (FedMergeError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if debug:
            raise
        _fail(f"{type(exc).__name__}: {exc}  (run with --debug for the traceback)")
        sys.exit(2)


if __name__ == "__main__":
    main()
