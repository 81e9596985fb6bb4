"""Command-line options shared by ``fedmerge serve`` and ``fedmerge serve-continual``: the operators'
metrics endpoint (``docs/metrics.md``) and the web dashboard (``docs/dashboard.md``)."""

from __future__ import annotations

from typing import Annotated

import typer

MetricsPort = Annotated[
    int | None,
    typer.Option(help="serve Prometheus metrics on this port (0 = any free port; docs/metrics.md)"),
]
MetricsHost = Annotated[str, typer.Option(help="address the metrics endpoint binds")]
MetricsAllowRemote = Annotated[
    bool,
    typer.Option(help="allow a non-loopback --metrics-host (the endpoint has no authentication)"),
]
DashboardPort = Annotated[
    int | None,
    typer.Option(help="serve the read-only web dashboard on this port (0 = any free port)"),
]
