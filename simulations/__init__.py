"""Federated simulations: seeded non-IID partitioners, built-in tasks and the client's local round.

- :mod:`simulations.partition` — IID, Dirichlet label skew, pathological k-class, quantity (power law)
  and task-per-client partitioners, plus per-client class histograms (JSON and PNG).
- :mod:`simulations.tasks` — the task plugin protocol and the built-in ``digits`` and ``tiny_lm`` tasks.
- :mod:`fedmerge.tasks.local_round` — one client's round: fine-tune (full or LoRA) and return the delta.
"""
