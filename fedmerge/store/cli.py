"""``fedmerge store …``: inspect and manage a model store (argument parsing and printing only)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from fedmerge.endpoint_options import S3Endpoint
from fedmerge.errors import FedMergeError
from fedmerge.store.evaluations import evaluations_of
from fedmerge.store.manifest import Version
from fedmerge.store.model_store import ModelStore
from fedmerge.store.s3_client import is_s3_url

app = typer.Typer(help="Inspect and manage a versioned model store.", no_args_is_help=True)
console = Console()

StoreOpt = Annotated[
    str,
    typer.Option(
        "--store",
        help="store directory, or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL, credentials from "
        "boto3's usual chain)",
        envvar="FEDMERGE_STORE",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


_CATALOG: dict[str, str | None] = {"url": None}


@app.callback()
def _options(
    catalog: Annotated[
        str | None,
        typer.Option(
            "--catalog",
            help="postgresql://user@host:port/db when the store's catalog is shared (default: the "
            "SQLite catalog inside the store)",
            envvar="FEDMERGE_CATALOG",
        ),
    ] = None,
    s3_endpoint: S3Endpoint = None,
) -> None:
    _CATALOG["url"] = catalog
    if s3_endpoint:  # every command below opens an s3:// store through boto3, which reads it there
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint


def _open(path: str) -> ModelStore:
    catalog = _CATALOG["url"]
    if is_s3_url(path):
        return cast(ModelStore, _run(lambda: ModelStore.open(path, catalog=catalog)))
    if not (Path(path) / "store.json").exists():
        _fail(f"{path} is not a model store (no store.json); pass --store with a store directory")
    return cast(ModelStore, _run(lambda: ModelStore.open(path, catalog=catalog)))


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=1)


def _emit(data: Any) -> None:
    typer.echo(json.dumps(data, indent=1, sort_keys=True, default=str))


def _run(fn: Any) -> Any:
    try:
        return fn()
    except FedMergeError as exc:
        _fail(str(exc))


@app.command()
def init(
    store: StoreOpt,
    base: Annotated[
        Path, typer.Option("--base", help="Hugging Face model directory (safetensors) or a .safetensors file")
    ],
    adapter: Annotated[
        Path | None, typer.Option("--adapter", help="a peft LoRA adapter trained on the base")
    ] = None,
    name: Annotated[str | None, typer.Option(help="the base's name (default: from config.json)")] = None,
    as_json: JsonOpt = False,
    catalog: Annotated[
        str | None,
        typer.Option(
            "--catalog",
            help="postgresql://… to keep the new store's catalog there",
            envvar="FEDMERGE_CATALOG",
        ),
    ] = None,
) -> None:
    """Create a new store's root version from a Hugging Face model (and optionally a peft adapter)."""
    from fedmerge.store.init import init_store

    url = catalog or _CATALOG["url"]

    def create() -> Any:
        if url is None:
            return init_store(store, base, adapter=adapter, name=name)
        with ModelStore.open(store, catalog=url) as opened:
            return init_store(opened, base, adapter=adapter, name=name)

    result = _run(create)
    if as_json:
        _emit(result.to_dict())
        return
    d = result.to_dict()
    console.print(
        f"root {d['root']} ({d['tensors']} tensors, files: {', '.join(d['files']) or 'none'}); "
        f"latest = {d['latest']}"
    )
    if not result.architecture_checked:
        console.print(f"[yellow]note:[/yellow] tensors not checked against config.json: {result.note}")


def contributor_counts(version: Version) -> dict[str, int]:
    """How many contributors a version lists (as ``store show`` does), accepted and rejected."""
    accepted = sum(1 for c in version.contributors if c.accepted)
    return {"total": len(version.contributors), "accepted": accepted,
            "rejected": len(version.contributors) - accepted}  # fmt: skip


def contributors_cell(version: Version) -> str:
    """``3 (2 rejected)``: every contributor ``store show`` lists; just the count when none was rejected."""
    n = contributor_counts(version)
    if not n["rejected"]:
        return str(n["total"])
    return f"{n['total']} ({n['rejected']} rejected)"


@app.command()
def versions(
    store: StoreOpt,
    round: Annotated[int | None, typer.Option(help="only this round")] = None,
    contributor: Annotated[str | None, typer.Option(help="only versions this client contributed to")] = None,
    method: Annotated[str | None, typer.Option(help="only this aggregator")] = None,
    limit: Annotated[int | None, typer.Option(help="at most this many, newest first")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List versions, newest first."""
    s = _open(store)
    found = _run(lambda: s.query(round=round, contributor=contributor, method=method, limit=limit))
    aliases = s.aliases()
    if as_json:
        _emit(
            [
                {
                    "id": v.id,
                    "kind": v.kind,
                    "method": v.method,
                    "round": v.round,
                    "parents": list(v.parents),
                    "aliases": sorted(a for a, t in aliases.items() if t == v.id),
                    "contributors": contributor_counts(v),
                    "content_hash": v.content_hash,
                    "created_at": v.created_at,
                }
                for v in found
            ]
        )
        return
    table = Table(title=f"versions in {store}")
    for col in ("id", "kind", "method", "round", "parents", "contributors", "aliases", "created"):
        table.add_column(col)
    for v in found:
        table.add_row(
            v.id,
            v.kind,
            v.method,
            "" if v.round is None else str(v.round),
            ",".join(v.parents),
            contributors_cell(v),
            ",".join(sorted(a for a, t in aliases.items() if t == v.id)),
            v.created_at[:19],
        )
    console.print(table)


@app.command()
def show(
    store: StoreOpt, version: Annotated[str, typer.Argument(help="id or alias")], as_json: JsonOpt = False
) -> None:
    """Show one version's manifest."""
    s = _open(store)
    v = _run(lambda: s.get(version))
    evaluations = _run(lambda: evaluations_of(s, v.id))
    if as_json:
        _emit({**json.loads(v.to_json()), "evaluations": [e.to_dict() for e in evaluations]})
        return
    table = Table(title=f"{v.id} ({v.kind})", show_header=False)
    rows = [
        ("content hash", v.content_hash),
        ("parents", ", ".join(v.parents) or "-"),
        ("base", f"{v.base_version} {v.base_hash}" if v.base_version else (v.name or "-")),
        ("method", f"{v.method} {json.dumps(v.params, sort_keys=True)}"),
        ("round", str(v.round)),
        ("metrics", json.dumps(v.metrics, sort_keys=True)),
        *[
            (
                f"federated evaluation (round {e.round})",
                f"{json.dumps(e.metrics, sort_keys=True)} over {e.num_examples} examples, "
                f"{len(e.accepted)} node(s) accepted, {len(e.dropped)} dropped",
            )
            for e in evaluations
        ],
        ("privacy", json.dumps(v.privacy, sort_keys=True)),
        ("aliases", ", ".join(s.aliases_of(v.id)) or "-"),
        ("created", v.created_at),
        ("fedmerge / format", f"{v.fedmerge_version} / {v.format_version}"),
        ("tensors", str(len(v.tensors))),
        ("state tensors", str(len(v.state))),
    ]
    for k, val in rows:
        table.add_row(k, val)
    console.print(table)
    if v.contributors:
        ct = Table(title="contributors")
        for col in ("client", "examples", "submission", "accepted", "reason"):
            ct.add_column(col)
        for c in v.contributors:
            ct.add_row(
                c.client_id, str(c.num_examples), c.submission_hash[:16], str(c.accepted), c.reason or ""
            )
        console.print(ct)


@app.command()
def lineage(store: StoreOpt, version: Annotated[str, typer.Argument()], as_json: JsonOpt = False) -> None:
    """Show the ancestry graph of a version."""
    s = _open(store)
    lin = _run(lambda: s.lineage(version))
    if as_json:
        _emit({"version": lin.version, "parents": {k: list(v) for k, v in lin.parents.items()}})
        return

    def grow(node: Tree, vid: str, seen: set[str]) -> None:
        for parent in lin.parents[vid]:
            v = s.get(parent)
            child = node.add(f"{parent} [dim]{v.kind} {v.method} round={v.round}[/dim]")
            if parent not in seen:
                grow(child, parent, seen | {parent})

    top = s.get(lin.version)
    tree = Tree(f"[bold]{top.id}[/bold] [dim]{top.kind} {top.method} round={top.round}[/dim]")
    grow(tree, lin.version, {lin.version})
    console.print(tree)


@app.command()
def diff(
    store: StoreOpt,
    a: Annotated[str, typer.Argument()],
    b: Annotated[str, typer.Argument()],
    as_json: JsonOpt = False,
) -> None:
    """Per-tensor norms of the change from A to B."""
    s = _open(store)
    d = _run(lambda: s.diff(a, b))
    if as_json:
        _emit(
            {
                "a": d.a,
                "b": d.b,
                "total_change_norm": d.total_change_norm,
                "tensors": [
                    {
                        "name": t.name,
                        "norm_a": t.norm_a,
                        "norm_b": t.norm_b,
                        "change_norm": t.change_norm,
                        "relative_change": t.relative_change,
                    }
                    for t in d.tensors
                ],
            }
        )
        return
    table = Table(title=f"{d.a} → {d.b}: ‖Δ‖ = {d.total_change_norm:.6g}")
    for col in ("tensor", "‖a‖", "‖b‖", "‖b−a‖", "relative"):
        table.add_column(col, justify="right" if col != "tensor" else "left")
    for t in d.tensors:
        table.add_row(
            t.name, f"{t.norm_a:.6g}", f"{t.norm_b:.6g}", f"{t.change_norm:.6g}", f"{t.relative_change:.3g}"
        )
    console.print(table)


@app.command()
def alias(
    store: StoreOpt,
    name: Annotated[str | None, typer.Argument(help="alias to set; omit to list aliases")] = None,
    version: Annotated[str | None, typer.Argument(help="id or alias it should name")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List aliases, or point NAME at VERSION."""
    s = _open(store)
    if name is not None:
        if version is None:
            _fail("give the version the alias should point at: `alias NAME VERSION`")
        previous = _run(lambda: s.set_alias(name, version or ""))
        if not as_json:
            console.print(f"{name}: {previous or '-'} → {s.resolve(name)}")
    if as_json:
        _emit(s.aliases())
    elif name is None:
        table = Table(title="aliases")
        table.add_column("alias")
        table.add_column("version")
        for a, v in s.aliases().items():
            table.add_row(a, v)
        console.print(table)


@app.command()
def rollback(
    store: StoreOpt,
    name: Annotated[str, typer.Argument(help="alias to move back, e.g. prod")],
    to: Annotated[
        str | None, typer.Option(help="version to move it to (default: undo its last move)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Move an alias back; nothing is deleted."""
    s = _open(store)
    target = _run(lambda: s.rollback(name, to))
    if as_json:
        _emit({"alias": name, "version": target})
    else:
        console.print(f"{name} → {target}")


@app.command()
def export(
    store: StoreOpt,
    version: Annotated[str, typer.Argument()],
    out: Annotated[Path, typer.Option("--out", help="new directory to write")],
    format: Annotated[
        str, typer.Option(help="safetensors (full weights, HF layout) or peft")
    ] = "safetensors",
    max_shard_bytes: Annotated[int, typer.Option(help="largest shard")] = 5 * 10**9,
    rank: Annotated[
        int | None, typer.Option(help="LoRA rank (peft); default: the exact rank, nothing truncated")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a version's weights."""
    s = _open(store)
    result = _run(lambda: s.export(version, out, format=format, max_shard_bytes=max_shard_bytes, rank=rank))
    if as_json:
        _emit(result.to_dict())
    else:
        console.print(f"exported {result.version} to {result.path}: {', '.join(result.files)}")


@app.command()
def verify(store: StoreOpt, as_json: JsonOpt = False) -> None:
    """Re-hash every blob and check every version; exit 1 on any problem."""
    s = _open(store)
    report = s.verify()
    if as_json:
        _emit(report.to_dict())
    else:
        console.print(
            f"checked {report.versions_checked} versions, {report.blobs_checked} blobs "
            f"({report.bytes_hashed} bytes); {len(report.leftovers)} leftovers"
        )
        if report.problems:
            table = Table(title="problems")
            for col in ("kind", "version", "tensor", "message"):
                table.add_column(col)
            for p in report.problems:
                table.add_row(p.kind, p.version or "", p.tensor or "", p.message)
            console.print(table)
        else:
            console.print("[green]ok[/green]")
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def gc(
    store: StoreOpt,
    grace_seconds: Annotated[float, typer.Option(help="keep anything younger than this")] = 3600.0,
    dry_run: Annotated[bool, typer.Option(help="report, remove nothing")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove unreferenced blobs and leftovers older than the grace period."""
    s = _open(store)
    report = _run(lambda: s.gc(grace_seconds, dry_run=dry_run))
    if as_json:
        _emit(report.to_dict())
    else:
        verb = "would remove" if dry_run else "removed"
        console.print(
            f"{verb} {len(report.removed_blobs)} blobs, {len(report.removed_files)} leftover files and "
            f"uploads, {len(report.removed_spool)} intake spool objects ({report.freed_bytes} bytes); "
            f"{report.kept_young} kept inside the grace period"
        )
        if dry_run:  # name each one, so an operator can check before running it for real
            for item in [*report.removed_blobs, *report.removed_files, *report.removed_spool]:
                typer.echo(f"  {item}")
