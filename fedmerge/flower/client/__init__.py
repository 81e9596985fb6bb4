"""The client side of the Flower adapters: what a ClientApp runs (it imports nothing server-side).

* :mod:`.reply` — the library for a ClientApp's ``train``: the round's base, τ = θ_trained − θ_base,
  encoding with error feedback and DP, the reply (``base_weights`` and ``fedmerge_reply`` are the
  public API, re-exported here);
* :mod:`.bulk` — uploads and base downloads over fedmerge's bulk gRPC channel, with the node's TLS;
* :mod:`.faults` — seeded dropouts and stragglers for simulations.
"""

from fedmerge.flower.client.reply import base_weights, fedmerge_reply

__all__ = ["base_weights", "fedmerge_reply"]
