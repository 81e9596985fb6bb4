"""The continual-merging intake service (gRPC) and the bulk channel; see ``docs/service.md``.

Server side: :class:`~fedmerge.service.server.IntakeServer` (with
:class:`~fedmerge.service.config.ServiceConfig`), :class:`~fedmerge.service.bulk.BulkStore`.
Client side (no torch import): :mod:`fedmerge.service.client` — ``submit_expert``, ``upload_bulk``...
Nothing heavy is imported here, so ``from fedmerge.service.client import upload_bulk`` stays light.
"""

__all__: list[str] = []
