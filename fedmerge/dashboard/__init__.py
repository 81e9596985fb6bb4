"""The read-only web dashboard over a model store (``fedmerge dashboard``; ``serve --dashboard-port``).

Entry point for the servers (``fedmerge serve`` / ``fedmerge serve-continual``):
:func:`start_in_background` (store — a directory, or ``s3://bucket/prefix`` with ``s3_endpoint`` —,
host, port, token; optionally the intake's status or data
directory, more tokens, the page refresh interval and a :class:`~fedmerge.service.config.TlsConfig`,
whose ``client_ca`` means mutual TLS) returns a :class:`RunningDashboard` (``.url``, ``.port``,
``.stop()``).

It serves the pages from a uvicorn server in a daemon thread and returns once the socket is bound
(``port=0`` picks a free port; ``RunningDashboard.port`` says which). ``token`` (and any of
``tokens``, e.g. every token of serve-continual's ``--tokens`` file) is required on every request when
set; binding a non-loopback ``host`` without one (or without mutual TLS) raises
:class:`DashboardConfigError`. With ``tls`` the dashboard speaks HTTPS; with ``tls.client_ca`` every
client must present a certificate signed by that CA.
``intake_dir`` is serve-continual's data directory (its ``queue.sqlite`` is read read-only);
``intake_status`` instead supplies the intake page's numbers directly.

Pages: versions and the lineage graph, one version (manifest, contributors with reasons, tensors,
privacy record, diff against its parent, export downloads), the run's per-round charts, the intake
queue; each page polls ``/api/fingerprint`` and swaps its content when a version is committed.
See ``docs/dashboard.md``.

The web dependencies (starlette, uvicorn, jinja2) are the optional extra ``fedmerge[dashboard]``; they
are imported only when a dashboard is created, and their absence raises
:class:`DashboardUnavailable` naming the install command.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmerge.dashboard.intake import IntakeStatus
from fedmerge.dashboard.views import NotAStoreError
from fedmerge.errors import ConfigError, FedMergeError
from fedmerge.service.config import TlsConfig

INSTALL_HINT = "pip install 'fedmerge[dashboard]'"
MIN_TOKEN_LENGTH = 16
START_TIMEOUT_S = 30.0


class DashboardUnavailable(FedMergeError, ImportError):
    """The optional web dependencies of the dashboard are not installed."""


class DashboardConfigError(ConfigError):
    """The dashboard cannot be started as asked (an exposed bind without a token, a short token, a
    port that is taken)."""


def require_extra() -> None:
    """Import the web dependencies or raise :class:`DashboardUnavailable` with the install command."""
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise DashboardUnavailable(
            f"the dashboard needs the optional web dependencies ({exc.name} is missing): {INSTALL_HINT}"
        ) from None


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_tokens(host: str, tokens: frozenset[str], tls: TlsConfig | None = None) -> None:
    """Refuse a non-loopback bind without authentication (a token, or mutual TLS: ``tls`` with a
    ``client_ca``), and tokens shorter than 16 characters."""
    for t in tokens:
        if len(t) < MIN_TOKEN_LENGTH:
            raise DashboardConfigError(
                f"a dashboard token is {len(t)} characters; use at least {MIN_TOKEN_LENGTH} "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')"
            )
    mutual_tls = tls is not None and tls.client_ca is not None
    if not tokens and not mutual_tls and not is_loopback(host):
        raise DashboardConfigError(
            f"binding the dashboard to {host} exposes the store to the network: pass a token "
            "(--dashboard-token / --token, or the servers' --tokens file), require client certificates "
            "(--tls-client-ca), or bind 127.0.0.1"
        )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: any free port)."""
    if not 0 <= port <= 65535:
        raise DashboardConfigError(f"dashboard port {port} must be in 0..65535")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DashboardConfigError(f"cannot resolve dashboard host {host!r}: {exc}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise DashboardConfigError(f"cannot bind the dashboard to {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int, scheme: str = "http") -> str:
    shown = host
    if host in ("0.0.0.0", "::", ""):
        shown = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        shown = f"[{host}]"
    return f"{scheme}://{shown}:{port}"


def build_app(
    store_root: str | Path,
    host: str,
    *,
    s3_endpoint: str | None = None,
    tokens: frozenset[str] = frozenset(),
    intake_dir: Path | None = None,
    intake_status: Callable[[], IntakeStatus] | None = None,
    refresh_ms: int = 2000,
    tls: TlsConfig | None = None,
) -> Any:
    """The Starlette application for ``store_root`` — a directory or ``s3://bucket/prefix`` at
    ``s3_endpoint`` (checks: extra installed, a store, tokens)."""
    require_extra()
    check_tokens(host, tokens, tls)
    from fedmerge.dashboard.app import Dashboard, create_app

    dashboard = Dashboard(
        store_root,
        s3_endpoint=s3_endpoint,
        tokens=tokens,
        intake_dir=intake_dir,
        intake_status=intake_status,
        loopback_only=is_loopback(host),
        refresh_ms=refresh_ms,
    )
    return create_app(dashboard)


@dataclass
class RunningDashboard:
    """A dashboard served from a daemon thread; :meth:`stop` shuts it down and joins the thread."""

    url: str
    port: int
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _sock: socket.socket = field(repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> RunningDashboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_server(app: Any, tls: TlsConfig | None = None) -> Any:
    """A uvicorn server for ``app`` (no access log, no signal handlers of its own outside main).

    With ``tls`` it speaks HTTPS with that certificate; with ``tls.client_ca`` the TLS handshake
    requires a client certificate signed by it (mutual TLS, as the intake's ``--tls-client-ca``).
    """
    import ssl

    import uvicorn

    ssl_options: dict[str, Any] = {}
    if tls is not None:
        ssl_options = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
        if tls.client_ca is not None:
            ssl_options |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="none",
        server_header=False,
        proxy_headers=False,
        **ssl_options,
    )
    return uvicorn.Server(config)


def start_in_background(
    store_root: str | Path,
    host: str,
    port: int,
    token: str | None,
    intake_status: Callable[[], IntakeStatus] | None = None,
    *,
    intake_dir: Path | None = None,
    tokens: Iterable[str] = (),
    refresh_ms: int = 2000,
    tls: TlsConfig | None = None,
    s3_endpoint: str | None = None,
) -> RunningDashboard:
    """Serve the dashboard of ``store_root`` on ``host:port`` from a daemon thread (see the module doc).

    Raises :class:`NotAStoreError`, :class:`DashboardConfigError` (token rules, port taken) or
    :class:`DashboardUnavailable` before anything is served.
    """
    accepted = frozenset(tokens) | (frozenset({token}) if token else frozenset())
    app = build_app(
        store_root,
        host,
        s3_endpoint=s3_endpoint,
        tokens=accepted,
        intake_dir=intake_dir,
        intake_status=intake_status,
        refresh_ms=refresh_ms,
        tls=tls,
    )
    sock = bind_socket(host, port)
    bound = int(sock.getsockname()[1])
    server = make_server(app, tls)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="fedmerge-dashboard", daemon=True
    )
    thread.start()
    for _ in range(int(START_TIMEOUT_S / 0.02)):
        if server.started or not thread.is_alive():
            break
        thread.join(0.02)
    if not server.started:
        server.should_exit = True
        sock.close()
        raise DashboardConfigError(
            f"the dashboard on {host}:{bound} did not start within {START_TIMEOUT_S} s"
        )
    url = url_of(host, bound, "https" if tls is not None else "http")
    return RunningDashboard(url=url, port=bound, _server=server, _thread=thread, _sock=sock)


__all__ = [
    "DashboardConfigError",
    "DashboardUnavailable",
    "IntakeStatus",
    "NotAStoreError",
    "RunningDashboard",
    "build_app",
    "start_in_background",
]
