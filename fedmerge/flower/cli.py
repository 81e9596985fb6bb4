"""``fedmerge serve`` (mounted into the main CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedmerge.endpoint_options import DashboardPort, MetricsAllowRemote, MetricsHost, MetricsPort

app = typer.Typer(add_completion=False)


@app.callback()
def _group() -> None:
    """Flower deployment commands (a group even with one command, so `serve` stays a sub-command)."""


@app.command()
def certs(
    folder: Annotated[Path, typer.Argument(help="directory to write (or, with --check, to check)")],
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="DNS name or IP address SuperNodes dial (repeat; 127.0.0.1 and localhost are always named)",
        ),
    ] = None,
    supernodes: Annotated[int, typer.Option(help="make N SuperNode key pairs supernode-1 … supernode-N")] = 0,
    supernode: Annotated[
        list[str] | None, typer.Option("--supernode", help="make a key pair for this SuperNode (repeat)")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="check DIR's certificates for each --host instead of writing")
    ] = False,
    days: Annotated[int, typer.Option(help="validity of the CA and the SuperLink's certificate")] = 365,
    connection: Annotated[
        str, typer.Option(help="the SuperLink connection's name in $FLWR_HOME/config.toml")
    ] = "fedmerge",
) -> None:
    """Make the CA, the SuperLink's TLS certificate and SuperNode key pairs (or check them with --check)."""
    from fedmerge.errors import FedMergeError
    from fedmerge.flower.certs import check_certificates, make_certificates, next_steps, node_names

    try:
        if check:
            names = check_certificates(folder, host or [])
            typer.echo(
                f"{folder / 'server.pem'}: signed by ca.crt, valid, its key matches; names {', '.join(names)}"
            )
            return
        made = make_certificates(folder, host or [], node_names(supernodes, supernode or []), days=days,
                                 connection=connection)  # fmt: skip
    except FedMergeError as exc:
        typer.echo(f"fedmerge certs: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(next_steps(made, connection))


@app.command()
def serve(
    store: Annotated[
        Path, typer.Option(help="model store directory (made by `fedmerge init`; see --create-store)")
    ] = Path("fedmerge-store"),
    create_store: Annotated[
        bool, typer.Option(help="create an empty store if --store is none (a built-in task fills it)")
    ] = False,
    host: str = typer.Option(
        "0.0.0.0", help="address the SuperLink binds (Fleet, Control and Runtime APIs share one port)"
    ),
    port: int = typer.Option(
        8000, help="the SuperLink's port: SuperNodes (--superlink HOST:PORT) and `flwr run` use it"
    ),
    certificates: Annotated[
        Path | None, typer.Option(help="directory with ca.crt, server.pem, server.key (TLS)")
    ] = None,
    insecure: bool = typer.Option(False, help="disable TLS (local testing only)"),
    supernode_auth: bool = typer.Option(
        True, help="only SuperNodes registered with `flwr supernode register` may connect (needs TLS)"
    ),
    state_dir: Annotated[
        Path | None, typer.Option(help="SuperLink state directory (default: STORE.superlink beside it)")
    ] = None,
    public_host: Annotated[
        list[str] | None,
        typer.Option(
            "--public-host", help="a name or IP SuperNodes dial (repeat): the certificate must name it"
        ),
    ] = None,
    app_dir: Annotated[
        Path,
        typer.Option("--app", help="the Flower app `flwr run` will start: its run config shapes the hints"),
    ] = Path("."),
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = "127.0.0.1",
    metrics_allow_remote: MetricsAllowRemote = False,
    dashboard_port: DashboardPort = None,
    dashboard_host: Annotated[
        str, typer.Option(help="address the dashboard binds; off loopback it requires --dashboard-token")
    ] = "127.0.0.1",
    dashboard_token: Annotated[
        str | None,
        typer.Option(
            envvar="FEDMERGE_DASHBOARD_TOKEN",
            help="bearer token the dashboard requires (≥ 16 characters; prefer the environment variable)",
        ),
    ] = None,
) -> None:
    """Start the SuperLink of a real deployment; `flwr run .` then starts the fedmerge ServerApp on it.

    SIGINT/SIGTERM are forwarded to the SuperLink; the exit code is the SuperLink's.
    """
    from fedmerge.errors import FedMergeError
    from fedmerge.flower.server.serve import serve_forever

    try:
        code = serve_forever(
            store,
            port=port,
            insecure=insecure,
            certificates=certificates,
            supernode_auth=supernode_auth,
            host=host,
            state_dir=state_dir,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            metrics_allow_remote=metrics_allow_remote,
            dashboard_port=dashboard_port,
            dashboard_host=dashboard_host,
            dashboard_token=dashboard_token,
            app=app_dir,
            create_store=create_store,
            public_hosts=public_host or [],
        )
    except FedMergeError as exc:
        typer.echo(f"fedmerge serve: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)
