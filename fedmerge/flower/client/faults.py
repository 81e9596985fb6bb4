"""Client-side fault injection for simulations: dropouts and stragglers, seeded and reproducible.

Run-config keys (0 by default, i.e. off), sent to clients in the ``train`` message's config:

- ``fault-dropout`` p_d: with probability p_d a sampled client does not reply this round — it raises
  :class:`InjectedDropout`, which Flower turns into an error reply that the server records as failed;
- ``fault-straggler`` p_s: with probability p_s it sleeps ``fault-straggler-delay-s`` seconds before
  training, so the round deadline (``round-deadline-s``) decides whether its reply still counts.

The two draws come from ``random.Random(sha256("fault/{seed}/{round}/{partition}"))`` (first draw:
dropout, second: straggler), so the same (seed, round, partition) always fails the same way, whatever
the process or the order in which clients run. No global RNG is touched.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedmerge.errors import FedMergeError
from fedmerge.seeds import labelled_digest

DROPOUT_KEY = "fault-dropout"
STRAGGLER_KEY = "fault-straggler"
DELAY_KEY = "fault-straggler-delay-s"


class InjectedDropout(FedMergeError, RuntimeError):
    """A simulated client dropout (``fault-dropout``): the client replies with an error this round."""


@dataclass(frozen=True)
class FaultPlan:
    """The probabilities of the two injected faults and the straggler's delay in seconds."""

    dropout: float = 0.0
    straggler: float = 0.0
    delay_s: float = 0.0

    @property
    def active(self) -> bool:
        return self.dropout > 0.0 or self.straggler > 0.0

    def to_record(self) -> dict[str, float]:
        """The config-record keys (empty when no fault is injected, so plain runs carry nothing)."""
        if not self.active:
            return {}
        return {DROPOUT_KEY: self.dropout, STRAGGLER_KEY: self.straggler, DELAY_KEY: self.delay_s}

    @staticmethod
    def from_record(conf: Mapping[str, Any]) -> FaultPlan:
        """Read the keys back from a ``train`` message's config (missing keys: no fault)."""
        return FaultPlan(
            float(conf.get(DROPOUT_KEY, 0.0)),
            float(conf.get(STRAGGLER_KEY, 0.0)),
            float(conf.get(DELAY_KEY, 0.0)),
        )


@dataclass(frozen=True)
class FaultDraw:
    """What the plan decided for one (seed, round, partition)."""

    drop: bool
    straggle: bool


def draw_faults(plan: FaultPlan, seed: int, round_: int, partition: int) -> FaultDraw:
    """Two uniform draws u₁, u₂ from the (seed, round, partition) stream: drop iff u₁ < p_d, straggle
    iff u₂ < p_s (a dropped client does not straggle)."""
    rng = random.Random(labelled_digest("fault", seed, round_, partition))
    u_drop, u_straggle = rng.random(), rng.random()
    drop = u_drop < plan.dropout
    return FaultDraw(drop=drop, straggle=not drop and u_straggle < plan.straggler)


def inject_faults(
    plan: FaultPlan,
    seed: int,
    round_: int,
    partition: int,
    sleep: Callable[[float], None] = time.sleep,
) -> FaultDraw:
    """Apply the draw: raise :class:`InjectedDropout` or sleep ``plan.delay_s``; returns the draw."""
    draw = draw_faults(plan, seed, round_, partition)
    if draw.drop:
        raise InjectedDropout(
            f"injected dropout: partition {partition} does not reply in round {round_} "
            f"(fault-dropout={plan.dropout:g}, seed={seed}); set fault-dropout=0 to turn it off"
        )
    if draw.straggle and plan.delay_s > 0:
        sleep(plan.delay_s)
    return draw
