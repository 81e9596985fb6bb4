"""Federated simulations: seeded non-IID partitioners, built-in tasks and the client's local round.

- :mod:`simulations.partition` — IID, Dirichlet label skew, pathological k-class, quantity (power law)
  and task-per-client partitioners, plus per-client class histograms (JSON and PNG).
- :mod:`simulations.tasks` — the built-in ``digits`` and ``tiny_lm`` tasks (the task protocol, ``get_task``
  and one client's round, ``local_round``, are the library's: :mod:`fedmerge.tasks`).
"""
