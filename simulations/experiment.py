"""Experiment configuration: which federations to simulate and what to compare.

A TOML recipe (see ``simulations/configs/default.toml``)::

    name = "digits-dirichlet"
    task = "digits"
    clients = 20
    fraction = 0.5          # of clients sampled per round
    rounds = 5
    seeds = [0, 1, 2]
    partitioner = { name = "dirichlet", alpha = 0.1 }
    device = "cpu"          # or "cuda"
    gpu_fraction = 0.0      # per virtual client, so many clients share one GPU
    faults = { dropout = 0.0, stragglers = 0.0 }
    tracking = "tensorboard" # optional: each committed round's metrics to TensorBoard or MLflow
    tracking_dir = "runs"   # default OUT/tracking; TensorBoard writes one run per trial under it
    [[aggregators]]
    name = "ties"
    params = { density = 0.2, divisor = "weight" }
    [[codecs]]
    name = "top10-int8"
    density = 0.1
    quantization = "int8"

expands into one :class:`Trial` per (aggregator, codec, seed). Every value is checked once, when
the file is read, and every problem is reported together in one :class:`ConfigError`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmerge.aggregators import available
from fedmerge.errors import ConfigError
from fedmerge.tracking import TRACKERS

PARTITIONERS = ("iid", "dirichlet", "pathological", "quantity", "task")


@dataclass(frozen=True)
class AggregatorSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def display(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class CodecSpec:
    """Client-side compression: ``density`` of top-k (1.0 = dense) and value ``quantization``."""

    name: str = "dense-fp32"
    density: float = 1.0
    quantization: str = "fp32"
    error_feedback: bool = True


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    task: str = "digits"
    clients: int = 20
    fraction: float = 0.5
    rounds: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    partitioner: dict[str, Any] = field(default_factory=lambda: {"name": "dirichlet", "alpha": 0.1})
    local_epochs: int = 2
    lr: float = 0.1
    mode: str = "full"  # "full" fine-tuning or "lora"
    device: str = "cpu"
    gpu_fraction: float = 0.0
    cpus_per_client: float = 1.0
    dropout: float = 0.0
    stragglers: float = 0.0
    aggregators: tuple[AggregatorSpec, ...] = (AggregatorSpec("fedavg"),)
    codecs: tuple[CodecSpec, ...] = (CodecSpec(),)
    tracking: str = ""  # "", "tensorboard" or "mlflow" (fedmerge/tracking.py)
    tracking_dir: str = ""

    def trials(self) -> list[Trial]:
        return [
            Trial(self, agg, codec, seed)
            for agg, codec, seed in itertools.product(self.aggregators, self.codecs, self.seeds)
        ]


@dataclass(frozen=True)
class Trial:
    """One federation to simulate: an aggregator, a codec and a seed under an experiment."""

    experiment: ExperimentConfig
    aggregator: AggregatorSpec
    codec: CodecSpec
    seed: int

    @property
    def key(self) -> str:
        """Stable id: changes whenever anything that affects the result changes (resumability)."""
        exp = asdict(self.experiment)
        for k in ("aggregators", "codecs", "seeds", "name", "tracking", "tracking_dir"):
            exp.pop(k)  # tracking records a trial; it does not change its result
        payload = json.dumps(
            {"exp": exp, "agg": asdict(self.aggregator), "codec": asdict(self.codec), "seed": self.seed},
            sort_keys=True,
        )
        digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
        return f"{self.aggregator.display}--{self.codec.name}--s{self.seed}--{digest}"


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def parse_config(raw: dict[str, Any], *, source: str = "config") -> ExperimentConfig:
    """Validate a parsed TOML document; raise one ConfigError listing every problem."""
    problems: list[str] = []
    known = set(ExperimentConfig.__dataclass_fields__) | {"faults"}
    for key in sorted(set(raw) - known):
        problems.append(f"unknown key {key!r}")
    get = raw.get
    clients = int(get("clients", 20))
    _check(problems, clients >= 1, f"clients must be ≥ 1, got {clients}")
    fraction = float(get("fraction", 0.5))
    _check(problems, 0 < fraction <= 1, f"fraction must be in (0, 1], got {fraction}")
    rounds = int(get("rounds", 5))
    _check(problems, rounds >= 1, f"rounds must be ≥ 1, got {rounds}")
    seeds = tuple(int(s) for s in get("seeds", [0, 1, 2]))
    _check(problems, len(seeds) >= 1, "seeds must list at least one seed")
    partitioner = dict(get("partitioner", {"name": "dirichlet", "alpha": 0.1}))
    _check(
        problems,
        partitioner.get("name") in PARTITIONERS,
        f"partitioner.name must be one of {PARTITIONERS}, got {partitioner.get('name')!r}",
    )
    device = str(get("device", "cpu"))
    _check(problems, device in ("cpu", "cuda"), f"device must be 'cpu' or 'cuda', got {device!r}")
    gpu_fraction = float(get("gpu_fraction", 0.0))
    _check(problems, 0 <= gpu_fraction <= 1, f"gpu_fraction must be in [0, 1], got {gpu_fraction}")
    _check(problems, not (device == "cuda" and gpu_fraction == 0), "device='cuda' needs gpu_fraction > 0")
    mode = str(get("mode", "full"))
    _check(problems, mode in ("full", "lora"), f"mode must be 'full' or 'lora', got {mode!r}")
    faults = dict(get("faults", {}))
    dropout, stragglers = float(faults.get("dropout", 0.0)), float(faults.get("stragglers", 0.0))
    _check(problems, 0 <= dropout < 1, f"faults.dropout must be in [0, 1), got {dropout}")
    _check(problems, 0 <= stragglers < 1, f"faults.stragglers must be in [0, 1), got {stragglers}")
    tracking = str(get("tracking", ""))
    _check(
        problems,
        tracking in ("", *TRACKERS),
        f'tracking must be one of {list(TRACKERS)} (or "" for none), got {tracking!r}',
    )
    aggregators = []
    for i, spec in enumerate(get("aggregators", [{"name": "fedavg"}])):
        name = spec.get("name")
        if name not in available():
            problems.append(f"aggregators[{i}].name {name!r} is not one of {available()}")
            continue
        aggregators.append(AggregatorSpec(name, dict(spec.get("params", {})), str(spec.get("label", ""))))
    labels = [a.display for a in aggregators]
    _check(problems, len(set(labels)) == len(labels), f"aggregator labels must be unique, got {labels}")
    codecs = []
    for i, spec in enumerate(get("codecs", [{"name": "dense-fp32"}])):
        density = float(spec.get("density", 1.0))
        quant = str(spec.get("quantization", "fp32"))
        _check(problems, 0 < density <= 1, f"codecs[{i}].density must be in (0, 1], got {density}")
        _check(
            problems,
            quant in ("fp32", "fp16", "bf16", "int8", "int4"),
            f"codecs[{i}].quantization must be fp32|fp16|bf16|int8|int4, got {quant!r}",
        )
        feedback = bool(spec.get("error_feedback", True))
        codecs.append(CodecSpec(str(spec.get("name", f"codec{i}")), density, quant, feedback))
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return ExperimentConfig(
        name=str(get("name", "experiment")),
        task=str(get("task", "digits")),
        clients=clients,
        fraction=fraction,
        rounds=rounds,
        seeds=seeds,
        partitioner=partitioner,
        local_epochs=int(get("local_epochs", 2)),
        lr=float(get("lr", 0.1)),
        mode=mode,
        device=device,
        gpu_fraction=gpu_fraction,
        cpus_per_client=float(get("cpus_per_client", 1.0)),
        dropout=dropout,
        stragglers=stragglers,
        aggregators=tuple(aggregators),
        codecs=tuple(codecs),
        tracking=tracking,
        tracking_dir=str(get("tracking_dir", "")),
    )


def load_config(path: str | Path) -> ExperimentConfig:
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"experiment config {p} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p} is not valid TOML: {err}") from None
    return parse_config(raw, source=str(p))


DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.toml"
