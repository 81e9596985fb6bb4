"""``fedmerge dashboard``: serve the read-only web dashboard of a store (argument parsing only).

The web dependencies are imported when the command runs, so ``fedmerge --help`` works without the
``fedmerge[dashboard]`` extra.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from fedmerge.endpoint_options import S3Endpoint
from fedmerge.store.s3_client import is_s3_url

app = typer.Typer(add_completion=False)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050


@app.command()
def dashboard(
    store: Annotated[
        str,
        typer.Option(
            "--store",
            help="store directory, or s3://bucket/prefix (with --s3-endpoint, and --catalog when its "
            "catalog is shared)",
            envvar="FEDMERGE_STORE",
        ),
    ] = "fedmerge-store",
    host: Annotated[
        str, typer.Option(help="address to bind; anything but loopback needs --token or --tokens")
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="TCP port (0: any free port)")] = DEFAULT_PORT,
    token: Annotated[
        str | None,
        typer.Option(help="bearer token every request must carry (env FEDMERGE_DASHBOARD_TOKEN)"),
    ] = None,
    tokens: Annotated[
        Path | None,
        typer.Option(help="serve-continual's token file ('CLIENT_ID TOKEN [operator]'); any one is accepted"),
    ] = None,
    intake: Annotated[
        Path | None,
        typer.Option(
            help="the intake's data directory (queue.sqlite); default <store>/../intake if there (the "
            "replicas' queue in the --catalog database is found there without it)"
        ),
    ] = None,
    refresh_ms: Annotated[int, typer.Option(help="how often pages poll for changes (0: never)")] = 2000,
    tls_cert: Annotated[Path | None, typer.Option(help="serve HTTPS with this certificate (PEM)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="the certificate's private key (PEM)")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="require client certificates signed by this CA (mutual TLS)")
    ] = None,
    catalog: Annotated[
        str | None,
        typer.Option(help="postgresql://… when the store's catalog is shared", envvar="FEDMERGE_CATALOG"),
    ] = None,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Serve the read-only web dashboard of a store: versions and lineage, runs, the intake."""
    if catalog:
        os.environ["FEDMERGE_CATALOG"] = catalog  # read by every page's open_store
    from fedmerge.dashboard import DashboardConfigError, bind_socket, build_app, make_server, url_of
    from fedmerge.dashboard.intake import find_queue
    from fedmerge.service.config import TlsConfig

    accepted: set[str] = set()
    token = token or os.environ.get("FEDMERGE_DASHBOARD_TOKEN") or None
    if token:
        accepted.add(token)
    if tokens is not None:
        from fedmerge.service.config import load_token_file

        accepted |= set(load_token_file(tokens)[0])
    if is_s3_url(store):
        shown = store
    elif s3_endpoint is not None:
        raise DashboardConfigError(
            f"--s3-endpoint {s3_endpoint} is given but --store {store} is a directory; pass "
            "s3://bucket/prefix or leave --s3-endpoint out"
        )
    else:
        shown = str(Path(store))
    if intake is None:
        default = None if is_s3_url(store) else Path(store).resolve().parent / "intake"
        intake = default if default is not None and find_queue(default) is not None else None
    elif find_queue(intake) is None:
        raise FileNotFoundError(f"--intake {intake} has no queue.sqlite (serve-continual's --data-dir)")
    tls = None
    if tls_cert is not None or tls_key is not None or tls_client_ca is not None:
        if tls_cert is None or tls_key is None:
            raise DashboardConfigError(
                "--tls-cert and --tls-key go together (and --tls-client-ca needs both)"
            )
        tls = TlsConfig(tls_cert, tls_key, tls_client_ca)
    app_ = build_app(
        store,
        host,
        s3_endpoint=s3_endpoint,
        tokens=frozenset(accepted),
        intake_dir=intake,
        refresh_ms=refresh_ms,
        tls=tls,
    )
    sock = bind_socket(host, port)
    url = url_of(host, int(sock.getsockname()[1]), "https" if tls is not None else "http")
    hint = "  (open it once with ?token=…)" if accepted else ""
    typer.echo(f"fedmerge dashboard of {shown} on {url}{hint}")
    typer.echo("press Ctrl-C to stop")
    sys.stdout.flush()
    # uvicorn re-raises the SIGINT it handled, after a clean shutdown
    with contextlib.suppress(KeyboardInterrupt):
        make_server(app_, tls).run(sockets=[sock])
    typer.echo("dashboard stopped")
