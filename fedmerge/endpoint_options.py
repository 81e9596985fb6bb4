"""Command-line options shared by ``fedmerge serve``, ``fedmerge serve-continual`` and ``fedmerge
dashboard``: the operators' metrics endpoint (``docs/metrics.md``), the web dashboard
(``docs/dashboard.md``) and the object store of an ``s3://`` store (``docs/store.md``)."""

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
S3Endpoint = Annotated[
    str | None,
    typer.Option(
        help="URL of the S3-compatible endpoint of an s3:// store (default AWS_ENDPOINT_URL, else "
        "AWS); credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile"
    ),
]
"""``--s3-endpoint``: the object store of an ``s3://bucket/prefix`` store (``serve-continual``,
``dashboard``)."""
