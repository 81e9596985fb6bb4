"""LoRA adapters: peft files ⇄ factors ⇄ dense deltas, and exact or fast merging.

A LoRA module (Hu et al. 2021) adds ΔW = s·B·A to a base weight W (out × in), with A (r × in),
B (out × r) and scaling s = α/r (α/√r with rsLoRA, Kalajdzievski 2023). Keys follow peft:
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``; the matching base weight is
``<module>.weight`` (e.g. ``model.layers.0.self_attn.q_proj.weight``).

Aggregation spaces for clients i with normalised weights w_i (:func:`merge_lora`):

- ``product`` (default): merge the dense ΔW_i = s_i·B_i·A_i with any aggregator, then re-factorise
  by SVD. **By default the rank is the one that represents the merged update exactly**: the largest
  numerical rank of any merged module (singular values above σ_max·max(m, n)·ε_fp32, the
  ``matrix_rank`` rule), which for the weighted mean is at most Σ r_i and never more than
  min(m, n). A smaller ``rank=`` truncates; the relative error it causes,
  ‖ΔW − s·B'A'‖_F / ‖ΔW‖_F, is reported per module (``residuals``) and over all modules together
  (``total_residual``), logged and raised as a :class:`LoraTruncationWarning` (Eckart–Young: it is
  the smallest error any factorisation of that rank can have).
- ``stack``: ΔW = Σ w_i s_i B_i A_i = [w_1 s_1 B_1 | … | w_n s_n B_n] · [A_1; …; A_n], rank Σ r_i.
  Exact, linear averaging only (FLoRA, Wang et al. 2024).
- ``factors``: A = Σ w_i A_i, B = Σ w_i B_i (FedIT, Zhang et al. 2024; Flower's FlowerTune). Fast but
  inexact: Σ w_i B_i A_i ≠ (Σ w_i B_i)(Σ w_i A_i) in general.

``product`` is the default because it is exact up to a reported truncation and works with every
aggregator (TIES, DARE…), which need the dense update.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from fedmerge.errors import ConfigError, IncompatibleDeltasError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
"""The key suffixes of a peft module's two factors (A: r × in, B: out × r)."""

logger = logging.getLogger(__name__)

Space = Literal["product", "stack", "factors"]
DenseAggregator = Callable[
    [Sequence[Mapping[str, torch.Tensor]], Sequence[float]], Mapping[str, torch.Tensor]
]


class LoraError(ConfigError):
    """An adapter cannot be read, written or merged as asked (the message names the file or module)."""


class LoraTruncationWarning(UserWarning):
    """A requested LoRA rank is below the exact rank: the factorised update differs from the merged one."""


@dataclass
class LoraModule:
    """One adapted weight: ΔW = scaling · B · A (transposed when the base stores W as in × out)."""

    A: torch.Tensor  # r × in
    B: torch.Tensor  # out × r
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """ΔW = scaling · B · A in fp32."""
        return self.scaling * (self.B.float() @ self.A.float())


@dataclass
class LoraAdapter:
    """Factors keyed by base weight name, the adapter settings, and what peft's config held besides."""

    modules: dict[str, LoraModule]
    rank: int
    alpha: float
    target_modules: tuple[str, ...] = ()
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    config: dict[str, Any] = field(default_factory=dict)  # the rest of adapter_config.json, kept on save
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # non-LoRA tensors of the adapter file
    residuals: dict[str, float] = field(
        default_factory=dict
    )  # relative SVD residual per module, if factorised
    total_residual: float = 0.0  # sqrt(Σ_m ‖ΔW_m − s·B_m·A_m‖²) / sqrt(Σ_m ‖ΔW_m‖²) over all modules
    exact_rank: int | None = None  # the rank that represents every factorised module exactly, if known


def scaling_for(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """peft's scaling: α/r, or α/√r with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


# ------------------------------------------------------------------------------------------------ I/O


def load_peft_adapter(directory: str | Path) -> LoraAdapter:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors`` written by peft (LoRA only)."""
    d = Path(directory)
    try:
        config_bytes = (d / ADAPTER_CONFIG).read_bytes()
        weights_bytes = (d / ADAPTER_WEIGHTS).read_bytes()
    except OSError as exc:
        raise LoraError(f"cannot read a peft adapter from {d}: {exc}") from exc
    return peft_adapter_from_bytes(config_bytes, weights_bytes, origin=str(d))


def _config_number(config: Mapping[str, Any], key: str, origin: str, *, integer: bool = False) -> float:
    if key not in config:
        raise LoraError(
            f"{origin}/{ADAPTER_CONFIG} lacks the required key {key!r} (a peft LoRA config names r, "
            "lora_alpha and target_modules; save the adapter with peft's save_pretrained)"
        )
    value = config[key]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0 or (integer and value != int(value)):
        kind = "a positive integer" if integer else "a positive finite number"
        raise LoraError(f"{origin}/{ADAPTER_CONFIG}: {key!r} must be {kind}, got {value!r}")
    return float(value)


def peft_adapter_from_bytes(
    config_bytes: bytes, weights_bytes: bytes, *, origin: str = "adapter"
) -> LoraAdapter:
    """A peft LoRA adapter from the bytes of its two files (no filesystem). Every failure is a
    :class:`LoraError` naming the file and the field or module: a config that is not a JSON object or
    lacks a positive ``r``/``lora_alpha``, weights that are not safetensors, a ``lora_B`` without its
    ``lora_A`` (or the reverse), factors that are not 2-D or whose ranks differ."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    try:
        config = json.loads(config_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoraError(f"{origin}/{ADAPTER_CONFIG} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LoraError(f"{origin}/{ADAPTER_CONFIG} must hold a JSON object, got {type(config).__name__}")
    try:
        tensors = load_bytes(weights_bytes)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise LoraError(f"{origin}/{ADAPTER_WEIGHTS} is not a safetensors file: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{origin}/{ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise LoraError(f"{origin}/{ADAPTER_CONFIG}: DoRA adapters are not supported (ΔW is not s·B·A)")
    if config.get("alpha_pattern"):
        raise LoraError(f"{origin}/{ADAPTER_CONFIG}: alpha_pattern is not supported; use one lora_alpha")
    alpha = _config_number(config, "lora_alpha", origin)
    rank = int(_config_number(config, "r", origin, integer=True))
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise LoraError(f"{origin}/{ADAPTER_CONFIG}: 'use_rslora' must be true or false, got {use_rslora!r}")
    modules: dict[str, LoraModule] = {}
    pairs = pair_factors(tensors)
    if pairs.unpaired:
        key, missing = pairs.unpaired[0]
        raise LoraError(
            f"{origin}/{ADAPTER_WEIGHTS}: {key!r} has no matching {missing!r}; "
            "send both factors of every adapted module"
        )
    for module, (a_key, b_key) in sorted(pairs.modules.items()):
        a, b = tensors[a_key], tensors[b_key]
        check_factor_ranks(module, a, b)
        name = module.removeprefix(PEFT_PREFIX) + ".weight"
        modules[name] = LoraModule(a, b, scaling_for(alpha, int(a.shape[0]), use_rslora))
    extra = {key: tensors[key] for key in pairs.others}
    targets = config.get("target_modules") or ()
    if not isinstance(targets, str | list | tuple) or not all(isinstance(t, str) for t in targets):
        raise LoraError(f"{origin}/{ADAPTER_CONFIG}: target_modules must be a string or a list of strings")
    return LoraAdapter(
        modules=modules,
        rank=rank,
        alpha=alpha,
        target_modules=(targets,) if isinstance(targets, str) else tuple(sorted(targets)),
        use_rslora=use_rslora,
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        config=config,
        extra=extra,
    )


@dataclass
class FactorPairs:
    """peft factor keys grouped by module (:func:`pair_factors`)."""

    modules: dict[str, tuple[str, str]]
    """module key (the name before ``.lora_A.weight``) → (A key, B key), for complete pairs."""
    unpaired: list[tuple[str, str]]
    """(key, the missing partner's key) for every factor without its partner, sorted by key."""
    others: list[str]
    """keys that are no LoRA factor, sorted."""


def pair_factors(keys: Iterable[str]) -> FactorPairs:
    """Group ``*.lora_A.weight`` / ``*.lora_B.weight`` keys by module: the one pairing rule of peft
    adapters and LoRA packages (each caller refuses ``unpaired`` and ``others`` in its own words)."""
    names = set(keys)
    pairs = FactorPairs({}, [], [])
    for key in sorted(names):
        if key.endswith(LORA_A):
            module, partner = key[: -len(LORA_A)], key[: -len(LORA_A)] + LORA_B
        elif key.endswith(LORA_B):
            module, partner = key[: -len(LORA_B)], key[: -len(LORA_B)] + LORA_A
        else:
            pairs.others.append(key)
            continue
        if partner not in names:
            pairs.unpaired.append((key, partner))
        elif key.endswith(LORA_A):
            pairs.modules[module] = (key, partner)
    return pairs


def check_factor_ranks(module: str, a: torch.Tensor, b: torch.Tensor, rank: int | None = None) -> None:
    """A (r × in) and B (out × r) of ``module`` must be 2-D with the same r (and r = ``rank`` when
    given); else :class:`LoraError` naming the module, both shapes and both ranks."""
    if a.dim() != 2 or b.dim() != 2:
        raise LoraError(
            f"module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} must be 2-D "
            "(A: r×in, B: out×r)"
        )
    if a.shape[0] != b.shape[1]:
        raise LoraError(
            f"module {module!r}: lora_A {tuple(a.shape)} has rank {a.shape[0]} but lora_B "
            f"{tuple(b.shape)} has rank {b.shape[1]}; both factors must have the same rank r"
        )
    if rank is not None and a.shape[0] != rank:
        raise LoraError(
            f"module {module!r}: factors have rank {a.shape[0]} but the adapter declares rank {rank}; "
            "every module must use the declared lora_rank"
        )


def save_peft_adapter(adapter: LoraAdapter, directory: str | Path) -> None:
    """Write the adapter as peft does; B is rescaled so that peft's α/r_m gives back exactly each ΔW.

    Modules whose rank differs from ``adapter.rank`` are listed in ``rank_pattern``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = dict(adapter.extra)
    rank_pattern: dict[str, int] = {}
    for name, mod in sorted(adapter.modules.items()):
        module = name.removesuffix(".weight")
        peft_scaling = scaling_for(adapter.alpha, mod.rank, adapter.use_rslora)
        tensors[PEFT_PREFIX + module + LORA_A] = mod.A.contiguous()
        tensors[PEFT_PREFIX + module + LORA_B] = (mod.B * (mod.scaling / peft_scaling)).contiguous()
        if mod.rank != adapter.rank:
            rank_pattern[module] = mod.rank
    config = dict(adapter.config)
    config.update(
        peft_type="LORA",
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        target_modules=sorted(adapter.target_modules)
        or sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in adapter.modules}),
        use_rslora=adapter.use_rslora,
        fan_in_fan_out=adapter.fan_in_fan_out,
        rank_pattern=rank_pattern,
        alpha_pattern={},
    )
    save_file(tensors, str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (d / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------ ΔW ⇄ factors


def lora_to_delta(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """Base weight name → ΔW = s·B·A (fp32, transposed to in × out when ``fan_in_fan_out``)."""
    return {
        name: (m.delta().T if adapter.fan_in_fan_out else m.delta()) for name, m in adapter.modules.items()
    }


def numerical_rank(delta_w: torch.Tensor) -> int:
    """The rank of ΔW as ``torch.linalg.matrix_rank`` counts it in fp32: singular values above
    σ_max · max(m, n) · ε_fp32 (0 for ΔW = 0). Factorising at this rank loses nothing but rounding."""
    if delta_w.dim() != 2:
        raise LoraError(f"numerical_rank needs a 2-D ΔW, got shape {tuple(delta_w.shape)}")
    s = torch.linalg.svdvals(delta_w.float())
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * max(delta_w.shape) * torch.finfo(torch.float32).eps
    return int((s > tol).sum())


def factorize(delta_w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD: (A r×in, B out×r, ‖ΔW − B·A‖_F / ‖ΔW‖_F) with B·A the best rank-r approximation.

    ΔW = U Σ Vᵀ; B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ (the singular values are split evenly). The residual is
    computed from the dropped singular values: sqrt(Σ_{i>r} σ_i²) / sqrt(Σ_i σ_i²) (0 for ΔW = 0).
    """
    if delta_w.dim() != 2:
        raise LoraError(f"factorize needs a 2-D ΔW, got shape {tuple(delta_w.shape)}")
    if rank < 1:
        raise LoraError(f"rank must be >= 1, got {rank}")
    u, s, vh = torch.linalg.svd(delta_w.float(), full_matrices=False)
    r = min(rank, int(s.numel()))
    root = s[:r].sqrt()
    b = u[:, :r] * root
    a = root[:, None] * vh[:r]
    if r < rank:  # pad with zero directions so every module has the requested rank
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
    total = float(s.double().pow(2).sum())
    dropped = float(s[r:].double().pow(2).sum())
    return a.contiguous(), b.contiguous(), math.sqrt(dropped / total) if total > 0 else 0.0


def delta_to_lora(
    delta: Mapping[str, torch.Tensor],
    rank: int | None = None,
    alpha: float | None = None,
    *,
    target_modules: Sequence[str] | None = None,
    use_rslora: bool = False,
) -> LoraAdapter:
    """Factorise every 2-D ΔW (or those whose module name ends with one of ``target_modules``).

    ``rank=None`` (default) factorises at the exact rank: the largest :func:`numerical_rank` of the
    selected modules (at least 1), so every module is represented exactly up to rounding. A smaller
    ``rank`` truncates each module to its best rank-r approximation (Eckart–Young). ``alpha``
    defaults to the rank (scaling 1). Each module's relative residual is in ``.residuals``, the
    residual over all modules together in ``.total_residual`` and the exact rank in ``.exact_rank``.
    """
    selected: dict[str, torch.Tensor] = {}
    for name in sorted(delta):
        module = name.removesuffix(".weight")
        chosen = target_modules is None or any(
            module == t or module.endswith("." + t) for t in target_modules
        )
        if not chosen:
            continue
        if delta[name].dim() != 2:
            if target_modules is None:
                continue
            raise LoraError(f"{name!r} has shape {tuple(delta[name].shape)}; LoRA adapts 2-D weights only")
        selected[name] = delta[name]
    if not selected:
        raise LoraError("no 2-D tensor matched target_modules; nothing to factorise")
    if rank is not None and rank < 1:
        raise LoraError(f"rank must be >= 1 (or None for the exact rank), got {rank}")
    exact = max(1, max(numerical_rank(t) for t in selected.values()))
    rank = exact if rank is None else rank
    alpha = float(rank if alpha is None else alpha)
    scaling = scaling_for(alpha, rank, use_rslora)
    modules: dict[str, LoraModule] = {}
    residuals: dict[str, float] = {}
    dropped = total = 0.0
    for name, d in selected.items():
        a, b, residuals[name] = factorize(d, rank)
        modules[name] = LoraModule(a, b / scaling, scaling)
        norm2 = float(d.double().pow(2).sum())
        total += norm2
        dropped += residuals[name] ** 2 * norm2
    targets = (
        tuple(sorted(target_modules))
        if target_modules
        else tuple(sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in modules}))
    )
    out = LoraAdapter(modules, rank, alpha, targets, use_rslora, residuals=residuals)
    out.total_residual = math.sqrt(dropped / total) if total > 0 else 0.0
    out.exact_rank = exact
    return out


def report_truncation(adapter: LoraAdapter, what: str = "LoRA factorisation") -> None:
    """Log and warn (:class:`LoraTruncationWarning`) when ``adapter`` was factorised below its exact
    rank, with the total and the worst per-module relative error; silent when nothing was lost."""
    if adapter.exact_rank is None or adapter.rank >= adapter.exact_rank:
        return
    worst = max(adapter.residuals, key=adapter.residuals.__getitem__)
    message = (
        f"{what}: rank {adapter.rank} is below the exact rank {adapter.exact_rank}; relative error "
        f"{adapter.total_residual:.3g} over all modules, worst {adapter.residuals[worst]:.3g} at {worst!r} "
        "(pass rank=None for an exact factorisation)"
    )
    logger.warning(message)
    warnings.warn(message, LoraTruncationWarning, stacklevel=3)


# -------------------------------------------------------------------------------------------- merging


def merge_lora(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    space: Space = "product",
    aggregator: DenseAggregator | None = None,
    *,
    rank: int | None = None,
    **params: Any,
) -> LoraAdapter:
    """Merge adapters in the chosen space (module docstring); weights default to equal.

    ``aggregator`` (product space only): None = weighted mean with weights normalised to sum 1, or the
    merge function ``(deltas, weights) -> merged`` (a registered method by name:
    :func:`fedmerge.aggregators.lora.merge_lora`). ``params`` are for that function only when
    the caller binds them; here they are refused. Input ranks may differ between adapters and modules.

    ``rank`` (product space): None (default) re-factorises at the exact rank of the merged update
    (:func:`delta_to_lora`; ≤ Σ r_i for the mean, ≤ min(m, n) always), so nothing is lost. A smaller
    rank truncates: the relative error per module is in ``.residuals``, over all modules in
    ``.total_residual``, and a :class:`LoraTruncationWarning` (also logged) says so.
    """
    ws = _weights(adapters, weights)
    _check_same_modules(adapters)
    if space == "product":
        deltas = [lora_to_delta(ad) for ad in adapters]
        merged = _aggregate(deltas, ws, aggregator, params)
        first = adapters[0]
        if first.fan_in_fan_out:
            raise LoraError(
                "product space with fan_in_fan_out adapters is not supported; use stack or factors"
            )
        out = delta_to_lora(merged, rank, target_modules=None)
        report_truncation(out, "merge_lora(space='product')")
        out.target_modules, out.config = first.target_modules, dict(first.config)
        return out
    if aggregator is not None or params:
        raise LoraError(
            f"space={space!r} averages linearly; aggregator and its params apply to space='product'"
        )
    norm = [w / sum(ws) for w in ws]
    if space == "stack":
        return _stack(adapters, norm)
    if space == "factors":
        return _factors(adapters, norm)
    raise LoraError(f"space must be 'product', 'stack' or 'factors', got {space!r}")


def _weights(adapters: Sequence[LoraAdapter], weights: Sequence[float] | None) -> list[float]:
    if not adapters:
        raise LoraError("merge_lora needs at least one adapter")
    ws = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(ws) != len(adapters):
        raise LoraError(f"got {len(adapters)} adapters but {len(ws)} weights")
    if any(w < 0 or not math.isfinite(w) for w in ws) or sum(ws) <= 0:
        raise LoraError(f"weights must be finite, >= 0 and not all 0, got {ws}")
    return ws


def _check_same_modules(adapters: Sequence[LoraAdapter]) -> None:
    ref = adapters[0]
    for i, ad in enumerate(adapters[1:], start=1):
        if set(ad.modules) != set(ref.modules):
            diff = sorted(set(ad.modules) ^ set(ref.modules))
            raise IncompatibleDeltasError(
                f"adapter {i} does not adapt the same modules as adapter 0 (first difference: {diff[0]!r})",
                diff[0],
            )
        for name, m in ad.modules.items():
            r = ref.modules[name]
            if (m.B.shape[0], m.A.shape[1]) != (r.B.shape[0], r.A.shape[1]):
                raise IncompatibleDeltasError(
                    f"module {name!r} is {m.B.shape[0]}×{m.A.shape[1]} in adapter {i} but "
                    f"{r.B.shape[0]}×{r.A.shape[1]} in adapter 0",
                    name,
                )
        if ad.fan_in_fan_out != ref.fan_in_fan_out:
            raise IncompatibleDeltasError(f"adapter {i} differs from adapter 0 in fan_in_fan_out")


def _aggregate(
    deltas: list[dict[str, torch.Tensor]],
    weights: list[float],
    aggregator: DenseAggregator | None,
    params: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    if params:
        raise LoraError(
            f"parameters {sorted(params)} need a method by name: fedmerge.aggregators.lora.merge_lora"
        )
    if aggregator is None:
        total = sum(weights)
        return {k: sum(w / total * d[k] for w, d in zip(weights, deltas, strict=True)) for k in deltas[0]}  # type: ignore[misc]
    if not callable(aggregator):
        raise LoraError(
            f"aggregator must be a merge function (deltas, weights) -> merged, got {aggregator!r}; "
            "merge with a registered method by name with fedmerge.aggregators.lora.merge_lora"
        )
    return dict(aggregator(deltas, weights))


def _stack(adapters: Sequence[LoraAdapter], norm: list[float]) -> LoraAdapter:
    modules = {}
    for name in adapters[0].modules:
        parts = [ad.modules[name] for ad in adapters]
        a = torch.cat([m.A.float() for m in parts], dim=0)
        b = torch.cat([w * m.scaling * m.B.float() for w, m in zip(norm, parts, strict=True)], dim=1)
        modules[name] = LoraModule(a, b, 1.0)
    rank = sum(ad.rank for ad in adapters)
    first = adapters[0]
    return LoraAdapter(
        modules, rank, float(rank), first.target_modules, False, first.fan_in_fan_out, dict(first.config)
    )


def _factors(adapters: Sequence[LoraAdapter], norm: list[float]) -> LoraAdapter:
    first = adapters[0]
    modules = {}
    for name, ref in first.modules.items():
        parts = [ad.modules[name] for ad in adapters]
        if any(m.rank != ref.rank or not math.isclose(m.scaling, ref.scaling) for m in parts):
            raise LoraError(
                f"factor averaging needs equal rank and scaling for every adapter; module {name!r} differs"
            )
        a = sum(w * m.A.float() for w, m in zip(norm, parts, strict=True))
        b = sum(w * m.B.float() for w, m in zip(norm, parts, strict=True))
        modules[name] = LoraModule(a, b, ref.scaling)  # type: ignore[arg-type]
    return LoraAdapter(
        modules,
        first.rank,
        first.alpha,
        first.target_modules,
        first.use_rslora,
        first.fan_in_fan_out,
        dict(first.config),
    )
