"""Flower app used as the reference transport by ``python -m bench bulk`` (see ``bench/bulk.py``)."""
