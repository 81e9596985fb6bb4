"""``serve-continual`` and ``push``: the command line of the intake service (a ``typer.Typer`` app).

    fedmerge serve-continual --store runs/store --base-weights base.safetensors --tokens tokens.txt
    fedmerge push expert.safetensors --server localhost:50051 --token $TOKEN

Also runnable as ``python -m fedmerge.service.cli``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fedmerge.endpoint_options import (
    DashboardPort,
    MetricsAllowRemote,
    MetricsHost,
    MetricsPort,
    S3Endpoint,
)
from fedmerge.errors import FedMergeError

app = typer.Typer(help="Continual-merging intake service.", no_args_is_help=True, add_completion=False)


def _parse_params(items: list[str]) -> dict[str, Any]:
    from fedmerge.service.config import ServiceConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ServiceConfigError(f"--param {item!r}: expected KEY=VALUE (VALUE as JSON, e.g. alpha=0.5)")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


@app.command("serve-continual")
def serve_continual(
    store: Annotated[
        str,
        typer.Option(
            help="model store directory (created if missing), or s3://bucket/prefix (blobs and the "
            "submitted experts in an S3-compatible object store; with --catalog, replicas share "
            "nothing else)"
        ),
    ],
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to listen on (port 0 = any free port)")
    ] = "127.0.0.1:50051",
    method: Annotated[
        str, typer.Option(help="continual merger: opcm, continual_task_arithmetic, ...")
    ] = "opcm",
    param: Annotated[
        list[str] | None, typer.Option(help="merger hyper-parameter KEY=VALUE (repeatable)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="experts merged per committed version")] = 1,
    base: Annotated[
        str | None, typer.Option(help="base version (id or alias); default the store's root")
    ] = None,
    base_weights: Annotated[
        Path | None,
        typer.Option(
            help="safetensors file or Hugging Face model directory committed as the base when the store "
            "is empty (as `fedmerge init` does)"
        ),
    ] = None,
    track: Annotated[str, typer.Option(help="alias moved to each continual version")] = "continual",
    data_dir: Annotated[
        Path | None, typer.Option(help="spool/queue/bulk directory (default <store>/../intake)")
    ] = None,
    tokens: Annotated[
        Path | None,
        typer.Option(help="file of 'CLIENT_ID TOKEN [operator]' lines (bearer auth; operator: reads all)"),
    ] = None,
    operator: Annotated[
        list[str] | None,
        typer.Option(help="client id (token client or mTLS common name) that may read every submission"),
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="server certificate (PEM)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="server private key (PEM)")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="CA for client certificates (mutual TLS)")
    ] = None,
    allow_insecure: Annotated[bool, typer.Option(help="serve without any authentication")] = False,
    max_submission_bytes: Annotated[int, typer.Option(help="per-expert size limit")] = 2 << 30,
    max_queued: Annotated[int, typer.Option(help="per-client queued experts limit")] = 64,
    max_workers: Annotated[int, typer.Option(help="gRPC handler threads")] = 16,
    max_message_bytes: Annotated[int, typer.Option(help="largest single gRPC message accepted")] = 8 << 20,
    max_concurrent_streams: Annotated[
        int, typer.Option(help="per-client open SubmitExpert/Upload streams (more: RESOURCE_EXHAUSTED)")
    ] = 4,
    stream_idle_timeout_s: Annotated[
        float,
        typer.Option(help="abort (DEADLINE_EXCEEDED) a SubmitExpert/Upload stream idle this many seconds"),
    ] = 30.0,
    port_file: Annotated[Path | None, typer.Option(help="write the bound port here once serving")] = None,
    catalog: Annotated[
        str | None,
        typer.Option(
            help="postgresql://user@host:port/db: catalog, queue and track lease shared by several "
            "replicas (with one shared --data-dir); default SQLite files for one server"
        ),
    ] = None,
    lease_ttl_s: Annotated[
        float, typer.Option(help="with --catalog: a dead replica's track is taken over after this long")
    ] = 15.0,
    s3_endpoint: S3Endpoint = None,
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = "127.0.0.1",
    metrics_allow_remote: MetricsAllowRemote = False,
    dashboard_port: DashboardPort = None,
    dashboard_host: Annotated[
        str,
        typer.Option(help="address the dashboard binds; off loopback it requires an operator's token"),
    ] = "127.0.0.1",
) -> None:
    """Serve the ExpertIntake and BulkUpload gRPC services and merge experts as they arrive."""
    from fedmerge.memory import use_mmap_for_large_allocations
    from fedmerge.metrics import FedmergeMetrics, MetricsServer, check_metrics_bind, start_metrics_server
    from fedmerge.service.config import Limits, ServiceConfig, TlsConfig, load_token_file
    from fedmerge.service.server import IntakeServer, open_store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    use_mmap_for_large_allocations()
    metrics = FedmergeMetrics() if metrics_port is not None else None
    metrics_server: MetricsServer | None = None
    dashboard: Any = None
    try:
        if metrics_port is not None:
            check_metrics_bind(metrics_host, metrics_allow_remote)  # before anything starts
        tls = None
        if tls_cert is not None or tls_key is not None:
            if tls_cert is None or tls_key is None:
                raise FedMergeError("--tls-cert and --tls-key go together")
            tls = TlsConfig(tls_cert, tls_key, tls_client_ca)
        token_table, operators = load_token_file(tokens) if tokens is not None else ({}, frozenset())
        config = ServiceConfig(
            store=store,
            data_dir=data_dir,
            listen=listen,
            method=method,
            params=_parse_params(param or []),
            batch_size=batch_size,
            base=base,
            track=track,
            tokens=token_table,
            operators=operators | frozenset(operator or ()),
            tls=tls,
            allow_insecure=allow_insecure,
            limits=Limits(
                max_submission_bytes=max_submission_bytes,
                max_queued=max_queued,
                max_concurrent_streams=max_concurrent_streams,
            ),
            max_workers=max_workers,
            max_message_bytes=max_message_bytes,
            stream_idle_timeout_s=stream_idle_timeout_s,
            catalog=catalog,
            lease_ttl_s=lease_ttl_s,
            s3_endpoint=s3_endpoint,
        )
        if catalog is not None:  # the dashboard (--dashboard-port) opens the store on it too
            os.environ["FEDMERGE_CATALOG"] = catalog
        if base_weights is not None:
            with open_store(config) as s:
                if not s.list(limit=1):  # the path of `fedmerge init`: a model directory keeps its files
                    from fedmerge.store.init import init_store

                    v = init_store(s, base_weights).root
                    typer.echo(f"committed base {base_weights} as {v.id}")
        dashboard_tokens = _dashboard_tokens(config, dashboard_host) if dashboard_port is not None else []
        server = IntakeServer(config, metrics=metrics)
        port = server.start()
        try:
            if metrics is not None and metrics_port is not None:
                metrics_server = start_metrics_server(
                    metrics.registry, metrics_host, metrics_port, allow_remote=metrics_allow_remote
                )
            if dashboard_port is not None:
                from fedmerge.dashboard import start_in_background

                dashboard = start_in_background(
                    config.store, dashboard_host, dashboard_port, None,  # a directory or s3://bucket/prefix
                    intake_dir=config.intake_dir, tokens=dashboard_tokens, s3_endpoint=config.s3_endpoint,
                )  # fmt: skip
        except FedMergeError:
            server.stop()
            if metrics_server is not None:
                metrics_server.stop()
            raise
    except FedMergeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if metrics_server is not None:
        typer.echo(f"serving metrics on {metrics_server.url}")
    if dashboard is not None:
        typer.echo(f"serving dashboard on {dashboard.url}")
    host = listen.rsplit(":", 1)[0]
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, port_file)
    typer.echo(f"serving ExpertIntake on {host}:{port} ({method}, batch {batch_size}, track {track!r})")
    signal.signal(signal.SIGTERM, lambda *_: server._stop.set())
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if metrics_server is not None:
            metrics_server.stop()
        if dashboard is not None:
            dashboard.stop()


def _dashboard_tokens(config: Any, host: str) -> list[str]:
    """The tokens the dashboard requires: none on a loopback ``host``; elsewhere those of the operators
    (the dashboard shows every client's submissions, which only operators may read through
    GetSubmission), at least one (ServiceConfigError otherwise)."""
    from fedmerge.metrics import is_loopback
    from fedmerge.service.config import ServiceConfigError

    if is_loopback(host):
        return []
    tokens = sorted(t for t, client in config.tokens.items() if client in config.operators)
    if not tokens:
        raise ServiceConfigError(
            f"--dashboard-host {host} is not a loopback address, so the dashboard requires an operator's "
            "bearer token and none is configured: give a token the operator role in --tokens (a third "
            "field 'operator') or bind the dashboard to 127.0.0.1"
        )
    return tokens


@app.command("push")
def push(
    path: Annotated[
        Path,
        typer.Argument(
            help="expert: *.safetensors checkpoint, Hugging Face model dir, peft adapter dir, or DeltaPackage"
        ),
    ],
    server: Annotated[str, typer.Option(help="HOST:PORT of the intake service")],
    token: Annotated[str | None, typer.Option(envvar="FEDMERGE_TOKEN", help="bearer token")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="checkpoint | peft_tar | delta_package")] = None,
    base_version: Annotated[str, typer.Option(help="base version the expert was fine-tuned from")] = "",
    label: Annotated[str, typer.Option(help="label recorded with the submission")] = "",
    wait: Annotated[bool, typer.Option(help="wait until merged and print the version")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the merge")] = 600.0,
    root_cert: Annotated[
        Path | None, typer.Option(help="CA that signed the server certificate (TLS)")
    ] = None,
    client_cert: Annotated[Path | None, typer.Option(help="client certificate (mutual TLS)")] = None,
    client_key: Annotated[Path | None, typer.Option(help="client key (mutual TLS)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Submit one expert (with a progress bar) and print the version it was merged into."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from fedmerge.service.client import (
        STATE_NAMES,
        ClientOptions,
        ServiceCallError,
        submit_expert,
        wait_merged,
    )

    if not path.exists():
        typer.echo(f"error: {path} does not exist", err=True)
        raise typer.Exit(2)
    opts = ClientOptions(
        server, token=token, root_cert=root_cert, client_cert=client_cert, client_key=client_key
    )
    try:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            disable=as_json or not sys.stderr.isatty(),
            transient=True,
        ) as bar:
            task = bar.add_task(f"pushing {path.name}", total=None)
            reply = submit_expert(
                opts,
                path,
                fmt=fmt,
                base_version=base_version,
                label=label,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        result: dict[str, Any] = {
            "submission_id": reply.submission_id,
            "sha256": reply.sha256,
            "duplicate": reply.duplicate,
            "state": STATE_NAMES.get(reply.state, "queued"),
        }
        if not as_json:
            typer.echo(f"accepted {reply.submission_id}{' (already submitted)' if reply.duplicate else ''}")
        if wait:
            sub = wait_merged(opts, reply.submission_id, timeout=timeout)
            result.update(
                state=STATE_NAMES[sub.state], version=sub.version or None, reason=sub.reason or None
            )
            if not as_json:
                if sub.version:
                    typer.echo(f"merged into version {sub.version}")
                else:
                    typer.echo(f"{STATE_NAMES[sub.state]}: {sub.reason}", err=True)
    except ServiceCallError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3 if exc.retryable else 1) from None
    if as_json:
        typer.echo(json.dumps(result))
    if result.get("state") in ("rejected", "failed"):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
