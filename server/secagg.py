"""The SecAgg+ ServerApp (``serverapp = "fedmerge_server.secagg:server_app"``): the server side of SecAgg+
rounds is :mod:`fedmerge.flower.server.secagg`; the sum mathematics :mod:`fedmerge.privacy.secagg`."""

from __future__ import annotations

from fedmerge.flower.server.secagg import make_server_app

server_app = make_server_app()
