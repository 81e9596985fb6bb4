"""The server side of the Flower adapters: the round engine a ServerApp runs and its neighbours.

* :mod:`.federation` — running the federation: messages, sampling, deadlines, retries, the round loop;
* :mod:`.judge` — judging replies: one decode path for every wire form, each check written once;
* :mod:`.commit` — the merge checked finite, privatised and committed as a version;
* :mod:`.safeguards` — robust-aggregation and DP settings the server enforces;
* :mod:`.spool_merge` — the tensor-major merge of replies spooled to disk;
* :mod:`.bulk_endpoint` — the bulk channel's server end (uploads in, bases out);
* :mod:`.evaluation` — Flower's evaluate messages and their num-examples-weighted metrics;
* :mod:`.exchange` — the send/collect loop both train and evaluate use;
* :mod:`.serve` — ``fedmerge serve``: the SuperLink of a real deployment.

Nothing under :mod:`fedmerge.flower.client` imports from here (tests/packaging/test_import_graph.py).
"""
