"""The Flower simulation backend settings fedmerge's apps run with.

Ray hands a call argument larger than ``max_direct_call_object_size`` (100 KiB by default) to its
shared-memory object store instead of inlining it in the call. A fedmerge node's ``Context`` carries
its cached base weights and its error-feedback residual (about twice the model), so for small models
every ClientApp call crossed that line: on the digits task (17 k parameters, 2 CPU slots) a call
took 34 ms instead of 13 ms and a 20-client round 0.40 s instead of 0.20 s. Inlining up to
:data:`RAY_INLINE_BYTES` removes that; larger states still go through the object store, where the
copy is cheap relative to the transfer.

``flwr run .`` on the simulation engine cannot pass Ray system settings; there, export
``RAY_max_direct_call_object_size=8388608`` before starting it (Ray reads ``RAY_<setting>``).
"""

from __future__ import annotations

from typing import Any

RAY_INLINE_BYTES = 8 << 20


def backend_config(num_cpus: float = 1, num_gpus: float = 0.0) -> dict[str, Any]:
    """``run_simulation(backend_config=...)``: per-client resources and the inline threshold above."""
    return {
        "client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "init_args": {"_system_config": {"max_direct_call_object_size": RAY_INLINE_BYTES}},
    }
