"""The Flower ServerApp of fedmerge (``server.app:app``)."""
