"""The dashboard's ASGI application (Starlette, server-rendered Jinja2 templates, inline SVG).

Routes (all ``GET``):

* ``/`` and ``/versions`` — every version (``?limit=1..500&offset=N``) and the lineage graph;
* ``/versions/{ref}`` — one version (id or alias): manifest, contributors, tensors, privacy, diff;
* ``/versions/{ref}/export/hf.tar`` and ``…/peft.tar`` — the export as a tar archive;
* ``/run`` (``?head=REF``) — per-round charts of the first-parent chain ending at ``latest``;
* ``/intake`` — the expert intake's queue (when the dashboard has one);
* ``/api/fingerprint`` — a short string that changes when a version is committed, an alias moves
  or the intake queue changes (the pages poll it and swap their content without a reload);
* ``/static/{name}`` — the stylesheet and script, served from memory (never a path from the URL).

Security: refs are checked against the alias/id syntax (else 400) and resolved in the catalog (else
404); when ``tokens`` is non-empty every request except ``/static`` needs one of them, as
``Authorization: Bearer <token>``, or ``?token=`` once (answered with an HttpOnly cookie and a redirect
to the same URL without it); otherwise 401. On a loopback bind the ``Host`` header must be a
loopback name (DNS rebinding is refused with 400). Errors are plain pages, never tracebacks.
"""

from __future__ import annotations

import hmac
import logging
import math
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route

from fedmerge.dashboard import svg
from fedmerge.dashboard.intake import IntakeStatus, IntakeUnreadable, find_queue, read_intake
from fedmerge.dashboard.views import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    default_head,
    fingerprint,
    open_store,
    rollbacks,
    run_view,
    version_detail,
    versions_page,
)
from fedmerge.errors import ConfigError, FedMergeError
from fedmerge.store import ModelStore, UnknownVersionError
from fedmerge.store.manifest import is_version_id
from fedmerge.store.s3_client import is_s3_url

log = logging.getLogger(__name__)

TOKEN_COOKIE = "fedmerge_dashboard_token"
STATIC_FILES = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
EXPORT_FORMATS = {"hf": "safetensors", "peft": "peft"}
_REF_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def check_ref(ref: str) -> str:
    """A URL's version reference must look like an id (``v000012``) or an alias (letters, digits,
    ``_.-``, at most 64); anything else (``..``, ``/``, ``%00``) is a 400 before the catalog is asked."""
    if is_version_id(ref):
        return ref
    if not (1 <= len(ref) <= 64) or not ref[0].isalpha() or not set(ref) <= _REF_CHARS:
        raise HTTPException(400, f"{ref[:80]!r} is not a version id (v000012) or an alias name")
    return ref


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPException(400, f"{name}={raw[:40]!r} is not an integer") from None
    if not lo <= value <= hi:
        raise HTTPException(400, f"{name}={value} must be in {lo}..{hi}")
    return value


class Dashboard:
    """The state behind the routes: the store root, the accepted tokens, where the intake is."""

    def __init__(
        self,
        store_root: str | Path,
        *,
        s3_endpoint: str | None = None,
        tokens: frozenset[str] = frozenset(),
        intake_dir: Path | None = None,
        intake_status: Callable[[], IntakeStatus] | None = None,
        loopback_only: bool = True,
        refresh_ms: int = 2000,
    ) -> None:
        self.store_root: str | Path = store_root if is_s3_url(store_root) else Path(store_root)
        self.s3_endpoint = s3_endpoint
        open_store(self.store_root, s3_endpoint=s3_endpoint).close()  # NotAStoreError now, not later
        self.tokens = tokens
        self.intake_dir = intake_dir
        self.intake_status = intake_status
        self.loopback_only = loopback_only
        self.refresh_ms = refresh_ms
        self._local = threading.local()
        self.env = Environment(
            loader=PackageLoader("fedmerge.dashboard", "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["num"] = _num
        self.env.filters["bytes"] = _bytes
        self.static = {
            name: (resources.files("fedmerge.dashboard").joinpath("static", name).read_bytes(), ctype)
            for name, ctype in STATIC_FILES.items()
        }

    # -- the store, one connection per worker thread (SQLite connections stay in their thread) --------

    def store(self) -> ModelStore:
        st: ModelStore | None = getattr(self._local, "store", None)
        if st is None:
            st = open_store(self.store_root, s3_endpoint=self.s3_endpoint)
            self._local.store = st
        return st

    def intake(self) -> IntakeStatus | None:
        if self.intake_status is not None:
            return self.intake_status()
        if find_queue(self.intake_dir) is None:  # a local queue, or the shared catalog's
            return None
        try:
            return read_intake(self.intake_dir)
        except IntakeUnreadable as exc:
            log.warning("intake page: %s", exc)
            return None

    def has_intake(self) -> bool:
        return self.intake_status is not None or find_queue(self.intake_dir) is not None

    # -- rendering --------------------------------------------------------------------------------

    def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(
            request_path=request.url.path,
            store_root=str(self.store_root),
            has_intake=self.has_intake(),
            refresh_ms=self.refresh_ms,
            **context,
        )
        return HTMLResponse(html, status_code=status_code)

    # -- routes -----------------------------------------------------------------------------------

    def versions(self, request: Request) -> Response:
        limit = _int_param(request, "limit", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        offset = _int_param(request, "offset", 0, 0, 10**9)
        st = self.store()
        page = versions_page(st, limit=limit, offset=offset)
        graph = svg.lineage_graph(page.versions, rollbacks(st))
        pages = {
            "newer": urlencode({"limit": limit, "offset": max(0, offset - limit)}) if offset > 0 else None,
            "older": urlencode({"limit": limit, "offset": offset + limit})
            if offset + limit < page.total
            else None,
        }
        return self.render(
            request, "versions.html", page=page, graph=Markup(graph), pages=pages, moves=rollbacks(st)
        )

    def version(self, request: Request) -> Response:
        ref = check_ref(request.path_params["ref"])
        detail = version_detail(self.store(), ref)
        return self.render(request, "version.html", d=detail, v=detail.version)

    def export(self, request: Request) -> Response:
        ref = check_ref(request.path_params["ref"])
        fmt = request.path_params["fmt"]
        if fmt not in EXPORT_FORMATS:
            raise HTTPException(404, f"no export format {fmt[:20]!r}; use hf.tar or peft.tar")
        st = self.store()
        vid = st.resolve(ref)
        work = Path(tempfile.mkdtemp(prefix="fedmerge-dashboard-export-"))
        try:
            st.export(vid, work / "out", format=EXPORT_FORMATS[fmt])
            archive = work / f"{vid}-{fmt}.tar"
            with tarfile.open(archive, "w") as tar:
                for path in sorted((work / "out").iterdir()):
                    tar.add(path, arcname=f"{vid}-{fmt}/{path.name}")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return FileResponse(
            archive,
            media_type="application/x-tar",
            filename=archive.name,
            background=BackgroundTask(shutil.rmtree, work, ignore_errors=True),
        )

    def run(self, request: Request) -> Response:
        st = self.store()
        raw = request.query_params.get("head")
        head = check_ref(raw) if raw is not None else default_head(st)
        if head is None:
            return self.render(request, "run.html", run=None, charts={})
        run = run_view(st, head)
        xs = [p.x for p in run.points]
        label = "round" if all(p.round is not None for p in run.points) else "round / sequence"

        def line(
            key: str, title: str, series: list[tuple[str, list[tuple[float, float]]]], **opts: Any
        ) -> str:
            return svg.line_chart(title, series, chart_id=f"chart-{key}", x_label=label, **opts)

        def named(*pairs: tuple[str, str]) -> list[tuple[str, list[tuple[float, float]]]]:
            return [(legend, run.series(name)) for legend, name in pairs]

        charts = {
            "accuracy": line(
                "accuracy",
                "accuracy per round",
                named(("server", "server-accuracy"), ("clients (test, weighted)", "clients-test-accuracy")),
            ),
            "loss": line(
                "loss",
                "loss per round",
                named(("server", "server-loss"), ("clients (train, weighted)", "clients-train-loss")),
            ),
            "bytes": line(
                "bytes",
                "bytes per round",
                named(
                    ("uplink", "uplink-bytes"),
                    ("downlink", "downlink-bytes"),
                    ("uplink if dense fp32", "uplink-dense-bytes"),
                ),
                y_min=0.0,
            ),
            "time": line(
                "time",
                "round time (s)",
                [("seconds", [(p.x, p.seconds) for p in run.points if p.seconds is not None])],
                y_min=0.0,
            ),
            "epsilon": line(
                "epsilon",
                "privacy budget ε spent",
                [("ε", [(p.x, p.epsilon) for p in run.points if p.epsilon is not None])],
                empty="no differential-privacy release in this run",
                y_min=0.0,
            ),
            "evaluation": line(
                "evaluation",
                "federated evaluation (weighted by num-examples)",
                run.evaluation_series(),
                empty="no federated evaluation in this run (fraction-evaluate = 0)",
            ),
            "clients": svg.stacked_bars(
                "contributors per round",
                xs,
                [
                    ("accepted", [float(p.accepted) for p in run.points]),
                    ("rejected", [float(p.rejected) for p in run.points]),
                ],
                chart_id="chart-clients",
                x_label=label,
            ),
        }
        return self.render(request, "run.html", run=run, charts={k: Markup(v) for k, v in charts.items()})

    def intake_page(self, request: Request) -> Response:
        status = self.intake()
        if status is None:
            raise HTTPException(404, "this dashboard has no expert intake (serve-continual's --data-dir)")
        rate = svg.stacked_bars(
            "submissions acknowledged per minute",
            [float(m) for m, _ in status.per_minute],
            [("submissions", [float(c) for _, c in status.per_minute])],
            chart_id="chart-intake-rate",
            x_label="minutes ago",
        )
        latency = svg.line_chart(
            "seconds from acknowledgement to merge",
            [("seconds", [(float(i + 1), s) for i, (_, s) in enumerate(status.ack_to_merge_s)])],
            chart_id="chart-intake-latency",
            x_label="recent merged submissions (oldest → newest)",
            y_min=0.0,
        )
        return self.render(request, "intake.html", s=status, rate=Markup(rate), latency=Markup(latency))

    def api_fingerprint(self, request: Request) -> Response:
        status = self.intake()
        extra = status.fingerprint() if status is not None else ""
        return JSONResponse({"fingerprint": fingerprint(self.store(), extra)})

    def static_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        found = self.static.get(name)
        if found is None:
            raise HTTPException(404, "no such asset")
        data, ctype = found
        return Response(data, media_type=ctype)

    # -- errors -----------------------------------------------------------------------------------

    def error_page(self, request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status)
        try:
            return self.render(request, "error.html", status_code=status, status=status, message=message)
        except Exception:  # the template itself failed: still no traceback
            return PlainTextResponse(f"{status}: {message}", status_code=status)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        return f"{value:.{digits}g}"
    return str(value)


def _bytes(value: Any) -> str:
    if value is None:
        return ""
    v = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(v) < 1000 or unit == "GB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1000
    return f"{v:.1f} GB"


class _Guard(BaseHTTPMiddleware):
    """Host check (loopback binds), token check (when tokens are configured), security headers."""

    def __init__(self, app: Any, dashboard: Dashboard) -> None:
        super().__init__(app)
        self.dashboard = dashboard

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        d = self.dashboard
        if d.loopback_only:
            host = request.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in LOOPBACK_NAMES:
                return _headers(d.error_page(request, 400, "this dashboard answers only to a loopback Host"))
        if d.tokens and not request.url.path.startswith("/static/"):
            given = request.query_params.get("token")
            if given is not None:
                if not _known(given, d.tokens):
                    return _headers(d.error_page(request, 401, "unknown token"))
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                # one leading slash: "//host/..." would be a redirect to another site
                target = "/" + request.url.path.lstrip("/") + ("?" + urlencode(rest) if rest else "")
                redirect = RedirectResponse(target, status_code=303)
                redirect.set_cookie(
                    TOKEN_COOKIE,
                    given,
                    httponly=True,
                    samesite="strict",
                    secure=request.url.scheme == "https",
                )
                return _headers(redirect)
            auth = request.headers.get("authorization", "")
            bearer = auth[len("Bearer ") :].strip() if auth.startswith("Bearer ") else None
            cookie = request.cookies.get(TOKEN_COOKIE)
            if not any(t is not None and _known(t, d.tokens) for t in (bearer, cookie)):
                response = d.error_page(
                    request,
                    401,
                    "this dashboard needs a token: open it once with ?token=… or send "
                    "'Authorization: Bearer <token>'",
                )
                response.headers["WWW-Authenticate"] = 'Bearer realm="fedmerge dashboard"'
                return _headers(response)
        return _headers(await call_next(request))


def _known(token: str, tokens: frozenset[str]) -> bool:
    """Constant-time membership (``hmac.compare_digest`` against every accepted token)."""
    found = False
    for t in tokens:
        found |= hmac.compare_digest(token.encode(), t.encode())
    return found


def _headers(response: Response) -> Response:
    for k, v in SECURITY_HEADERS.items():
        response.headers.setdefault(k, v)
    return response


def create_app(dashboard: Dashboard) -> Starlette:
    """The Starlette application of ``dashboard`` (debug off; every error a plain page, status kept)."""

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return dashboard.error_page(request, exc.status_code, str(exc.detail))

    async def unknown_version(request: Request, exc: Exception) -> Response:
        return dashboard.error_page(request, 404, str(exc))

    async def bad_request(request: Request, exc: Exception) -> Response:
        return dashboard.error_page(request, 400, str(exc))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("dashboard: %s %s failed: %r", request.method, request.url.path, exc)
        if isinstance(exc, FedMergeError):
            return dashboard.error_page(request, 500, f"{type(exc).__name__}: {exc}")
        return dashboard.error_page(request, 500, "internal error; the server log has the details")

    routes = [
        Route("/", dashboard.versions),
        Route("/versions", dashboard.versions),
        Route("/versions/{ref}", dashboard.version),
        Route("/versions/{ref}/export/{fmt}.tar", dashboard.export),
        Route("/run", dashboard.run),
        Route("/intake", dashboard.intake_page),
        Route("/api/fingerprint", dashboard.api_fingerprint),
        Route("/static/{name}", dashboard.static_file),
    ]
    return Starlette(
        debug=False,
        routes=routes,
        middleware=[Middleware(_Guard, dashboard=dashboard)],
        exception_handlers={
            HTTPException: http_error,
            UnknownVersionError: unknown_version,
            ConfigError: bad_request,
            Exception: server_error,
        },
    )


__all__ = ["Dashboard", "create_app"]
