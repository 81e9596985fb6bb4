"""fedmerge: federated and continual model merging.

Clients send what changed (task vectors or LoRA deltas), the server merges them with a pluggable
aggregator and keeps every merged model as an immutable, versioned artefact.
"""

__version__ = "0.1.0"
FORMAT_VERSION = 1

__all__ = ["FORMAT_VERSION", "__version__"]
