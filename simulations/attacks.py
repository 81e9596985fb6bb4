"""Attack simulations: an in-process federated loop on a built-in task with a fraction of malicious clients,
run against every aggregator / defence, measuring global accuracy and backdoor success.

Honest clients run :func:`fedmerge.tasks.local_round.local_round` (real training, seeded by (seed, round,
client)). The first ⌈f·N⌉ clients of a seeded permutation are malicious and send, per round:

    sign_flip    −τ_own                     (τ_own: an honest update on their own data)
    scaling      (N/m)·τ_bd                 model replacement (Bagdasaryan et al. 2020): the backdoor
                                            update τ_bd (below) boosted by N/m so it survives averaging
    noise        N(0, σ²), σ = 10·‖τ_own‖/√P  (a Gaussian update ten times an honest update's norm)
    label_flip   τ trained on y → (K−1) − y   (Tolpegin et al. 2020)
    backdoor     τ trained with half the local images stamped with the trigger (pixels
                 ``TRIGGER_PIXELS`` = 1) and relabelled ``TARGET_LABEL`` (Gu et al. 2017, BadNets)

Defences: the aggregators ``fedavg``, ``ties`` (density 0.2, divisor = weight), ``median``,
``trimmed_mean`` (β = 0.2), ``krum``, ``multi_krum``, ``robust_ties``, ``norm_bounded``
(fedavg of the deltas clipped to the round's median
client norm, Sun et al. 2019) and ``fedavg+reject`` (:func:`fedmerge.privacy.merge_with_rejection`:
drop clients whose robust norm z-score > 3 or whose cosine to the first-pass merge < 0, then FedAvg).

Metrics of the final global model: accuracy on the task's global test set, and the backdoor success
rate = the fraction of global test images whose true label is not the target that the model assigns
to the target once stamped with the trigger (measured for every attack, so the clean rate is the floor).
A run whose global weights become non-finite stops there and is reported with ``diverged = True``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from fedmerge.aggregators import create
from fedmerge.delta.state_dict import StateDict
from fedmerge.errors import ConfigError
from fedmerge.privacy import delta_norm, merge_with_rejection
from fedmerge.tasks.base import ClientData, Split, Task
from fedmerge.tasks.local_round import client_generator, local_round
from fedmerge_simulations.tasks import get_task

ATTACKS = ("none", "sign_flip", "scaling", "noise", "label_flip", "backdoor")
DEFENCES = (
    "fedavg",
    "ties",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "norm_bounded",
    "robust_ties",
    "fedavg+reject",
)
TRIGGER_PIXELS = (54, 55, 62, 63)  # the bottom-right 2×2 corner of the 8×8 digit image
TARGET_LABEL = 0
POISON_FRACTION = 0.5


@dataclass(frozen=True)
class AttackConfig:
    """One experiment grid: every attack × every defence at one malicious fraction."""

    task: str = "digits"
    num_clients: int = 20
    malicious_fraction: float = 0.2
    rounds: int = 5
    local_epochs: int = 2
    lr: float = 0.1
    batch_size: int = 32
    seed: int = 0
    partitioner: str = "iid"
    attacks: tuple[str, ...] = ATTACKS
    defences: tuple[str, ...] = DEFENCES

    def __post_init__(self) -> None:
        if not 0.0 <= self.malicious_fraction < 0.5:
            raise ConfigError(
                f"malicious_fraction={self.malicious_fraction} must be in [0, 0.5): robust aggregators "
                "assume an honest majority"
            )
        if self.num_clients < 5:
            raise ConfigError(f"num_clients={self.num_clients} must be ≥ 5 (Krum needs n ≥ 2f + 3)")
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds} must be ≥ 1")
        for name in self.attacks:
            if name not in ATTACKS:
                raise ConfigError(f"unknown attack {name!r}; choose from {ATTACKS}")
        for name in self.defences:
            if name not in DEFENCES:
                raise ConfigError(f"unknown defence {name!r}; choose from {DEFENCES}")

    @property
    def num_malicious(self) -> int:
        return math.ceil(self.malicious_fraction * self.num_clients)


@dataclass
class AttackResult:
    attack: str
    defence: str
    malicious_fraction: float
    seed: int
    accuracy: float
    backdoor_success: float
    accuracy_per_round: list[float] = field(default_factory=list)
    malicious: list[int] = field(default_factory=list)
    rejected_malicious: int = 0
    rejected_honest: int = 0
    diverged: bool = False
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stamp_trigger(x: torch.Tensor) -> torch.Tensor:
    """A copy of the flattened images with the trigger pixels set to 1 (the maximum intensity)."""
    out = x.clone()
    out[:, list(TRIGGER_PIXELS)] = 1.0
    return out


def poison(split: Split, fraction: float, generator: torch.Generator) -> Split:
    """Stamp a seeded ``fraction`` of the images with the trigger and relabel them TARGET_LABEL."""
    n = len(split)
    idx = torch.randperm(n, generator=generator)[: round(fraction * n)]
    x, y = split.x.clone(), split.y.clone()
    x[idx] = stamp_trigger(x[idx])
    y[idx] = TARGET_LABEL
    return Split(x, y, split.groups)


def flip_labels(split: Split, num_classes: int) -> Split:
    """y → (K − 1) − y."""
    return Split(split.x, (num_classes - 1) - split.y, split.groups)


def malicious_clients(cfg: AttackConfig) -> list[int]:
    """The first ⌈f·N⌉ clients of a permutation seeded by ``cfg.seed``."""
    perm = np.random.default_rng([cfg.seed, 7919]).permutation(cfg.num_clients)
    return sorted(int(i) for i in perm[: cfg.num_malicious])


def _train(task: Task, base: StateDict, data: ClientData, cfg: AttackConfig, round_: int) -> StateDict:
    update = local_round(
        task, base, data, seed=cfg.seed, round_=round_, mode="full",
        epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
    )  # fmt: skip
    return dict(update.delta)


def malicious_update(
    attack: str, task: Task, base: StateDict, data: ClientData, cfg: AttackConfig, round_: int
) -> StateDict:
    """The delta a malicious client sends under ``attack`` (module doc)."""
    gen = client_generator(cfg.seed + 1, round_, data.client_id)
    if attack == "label_flip":
        k = int(task.num_classes or 0)
        return _train(
            task, base, ClientData(data.client_id, flip_labels(data.train, k), data.test), cfg, round_
        )
    if attack in ("backdoor", "scaling"):
        poisoned = ClientData(data.client_id, poison(data.train, POISON_FRACTION, gen), data.test)
        delta = _train(task, base, poisoned, cfg, round_)
        if attack == "scaling":
            boost = cfg.num_clients / max(cfg.num_malicious, 1)
            delta = {k: v * boost for k, v in delta.items()}
        return delta
    own = _train(task, base, data, cfg, round_)
    if attack == "sign_flip":
        return {k: -v for k, v in own.items()}
    if attack == "noise":
        numel = sum(v.numel() for v in own.values())
        sigma = 10.0 * delta_norm(own) / math.sqrt(numel)
        return {k: torch.randn(v.shape, generator=gen) * sigma for k, v in own.items()}
    raise ConfigError(f"unknown attack {attack!r}; choose from {ATTACKS}")


def aggregate(
    defence: str, deltas: Mapping[int, StateDict], weights: Mapping[int, float], seed: int, round_: int
) -> tuple[StateDict, set[int]]:
    """(merged delta, clients the defence rejected: only ``fedavg+reject`` rejects explicitly)."""
    if defence == "fedavg+reject":
        merged, scores = merge_with_rejection(
            "fedavg", deltas, weights, max_norm_score=3.0, min_cosine=0.0, seed=seed, round=round_
        )
        return merged, {c for c, s in scores.items() if s["rejected"]}
    params: dict[str, Any] = {"seed": seed, "round": round_}
    if defence == "trimmed_mean":
        params["beta"] = 0.2
    if defence == "ties":
        params["divisor"] = "weight"  # weights are numbers of examples: a weighted disjoint mean
    if defence == "norm_bounded":
        params["max_norm"] = statistics.median(delta_norm(d) for d in deltas.values())
    agg = create(defence, **params)
    first = next(iter(deltas.values()))
    agg.begin({k: tuple(v.shape) for k, v in first.items()})
    for cid in sorted(deltas):
        agg.add(deltas[cid], weights[cid], client_id=cid)
    return agg.finalize(), set()


def backdoor_success(task: Task, model: torch.nn.Module, test: Split) -> float:
    """Fraction of non-target test images classified as TARGET_LABEL once the trigger is stamped."""
    keep = test.y != TARGET_LABEL
    x = stamp_trigger(test.x[keep])
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(dim=-1)
    return float((pred == TARGET_LABEL).float().mean())


def evaluate(task: Task, weights: StateDict, seed: int) -> tuple[float, float]:
    """(global test accuracy, backdoor success rate) of ``weights``."""
    model = task.build_model(seed)
    model.load_state_dict(weights)
    test = task.global_test_set()
    acc = float(task.evaluate(model, test)["accuracy"])
    return acc, backdoor_success(task, model, test)


def run_one(attack: str, defence: str, cfg: AttackConfig) -> AttackResult:
    """``cfg.rounds`` federated rounds of ``defence`` under ``attack``; the final model's metrics."""
    t0 = time.perf_counter()
    task = get_task(cfg.task)
    args = {"alpha": 0.5} if cfg.partitioner == "dirichlet" else {}
    clients = task.client_datasets(cfg.num_clients, cfg.partitioner, cfg.seed, **args)
    bad = set(malicious_clients(cfg)) if attack != "none" else set()
    weights = {c.client_id: float(c.num_examples) for c in clients}
    model = dict(task.pretrained_base(cfg.seed))
    result = AttackResult(attack, defence, cfg.malicious_fraction, cfg.seed, 0.0, 0.0, malicious=sorted(bad))
    for round_ in range(1, cfg.rounds + 1):
        deltas = {
            c.client_id: malicious_update(attack, task, model, c, cfg, round_)
            if c.client_id in bad
            else _train(task, model, c, cfg, round_)
            for c in clients
        }
        merged, rejected = aggregate(defence, deltas, weights, cfg.seed, round_)
        result.rejected_malicious += len(rejected & bad)
        result.rejected_honest += len(rejected - bad)
        model = {k: v + merged[k].to(v.dtype) if k in merged else v for k, v in model.items()}
        acc, bd = evaluate(task, model, cfg.seed)
        result.accuracy_per_round.append(acc)
        if not all(bool(torch.isfinite(v).all()) for v in model.values()):
            result.diverged = True  # the weights hold NaN/Inf: no later round can train on them
            break
    result.accuracy, result.backdoor_success = acc, bd
    result.wall_s = time.perf_counter() - t0
    return result


def run_grid(cfg: AttackConfig, attacks: Sequence[str] | None = None) -> list[AttackResult]:
    """Every attack × defence of ``cfg`` (``none`` is the clean reference of each defence)."""
    torch.set_num_threads(1)
    return [run_one(a, d, cfg) for a in (attacks or cfg.attacks) for d in cfg.defences]
