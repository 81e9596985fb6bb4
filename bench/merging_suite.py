"""The miniature of ``python -m bench merging``: its tasks, the pre-trained base, the experts (full
fine-tunes and peft LoRA) and their diagonal Fishers (see :mod:`fedmerge_bench.merging`).

Two pre-training regimes (``Config.pretrain``):

* ``broad`` (the default): the base body (64 → 1024 → 1024) is pre-trained for one epoch on a small
  fraction (10 %) of the images seen through *every* task's input view and through no view, labelled
  by the digit — a broad objective no single task is, as CLIP's contrastive pre-training covers its
  downstream tasks' images without their labels. Its zero-shot accuracy is about 40 % of the experts'
  (CLIP ViT-B/32: ≈ 48 % zero-shot against ≈ 90 % fine-tuned). The experts then fine-tune the wide
  body gently (Adam 5e-4, 15 epochs), so their task vectors are small and redundant, as real
  fine-tunes of an over-parameterised pre-trained model are.
* ``upright``: the earlier miniature — a 128-wide body pre-trained on upright digits only, the experts
  re-wiring it with Adam 3e-3 for 30 epochs; no shared representation of the tasks' views, dense task
  vectors (kept for comparison: bench/RESULTS.md explains why it cannot reproduce the ordering).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from torch.func import functional_call

from fedmerge_simulations.continual_digits import digits_split, generator, pixel_permutation, train

LORA_TARGETS = ("0.0", "0.2")  # the body's two Linear layers inside nn.Sequential(body, head)


def _img(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 8, 8)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 64)


@dataclass(frozen=True)
class TaskSpec:
    """One task: an input transformation and a label map of the digits."""

    name: str
    transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, permutation) → x'
    classes: int = 10
    permuted_fraction: float = 0.0

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        return y % self.classes if self.classes < 10 else y


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("rot90", lambda x, p: _flat(torch.rot90(_img(x), 1, (1, 2)))),
    TaskSpec("rot180", lambda x, p: _flat(torch.rot90(_img(x), 2, (1, 2)))),
    TaskSpec("mirror", lambda x, p: _flat(torch.flip(_img(x), (2,)))),
    TaskSpec("invert", lambda x, p: 1.0 - x),
    TaskSpec("permute50", lambda x, p: x[:, p], permuted_fraction=0.5),
    TaskSpec("permute100", lambda x, p: x[:, p], permuted_fraction=1.0),
    TaskSpec("flipud_parity", lambda x, p: _flat(torch.flip(_img(x), (1,))), classes=2),
    TaskSpec("rot270inv_mod3", lambda x, p: _flat(torch.rot90(_img(1.0 - x), 3, (1, 2))), classes=3),
)


@dataclass(frozen=True)
class Config:
    """Sizes and training settings (``--quick`` shortens epochs and seeds, not tasks); the defaults are
    the ``broad`` regime's (module docstring), :data:`UPRIGHT` the earlier one's."""

    tasks: int = 8
    hidden: int = 1024
    pretrain: str = "broad"  # "broad" or "upright" (module docstring)
    pretrain_fraction: float = 0.1  # broad: the images pre-trained on, in every view
    pretrain_epochs: int = 1
    finetune_epochs: int = 15
    lr: float = 3e-3  # Adam, pre-training
    finetune_lr: float = 5e-4  # Adam, fine-tuning the experts
    batch_size: int = 64
    val_size: int = 200
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_lr: float = 1e-2  # LoRA factors train at a larger step than full weights (Hu et al. 2021)
    lora: bool = True


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


@dataclass
class Suite:
    """One seed's base body, experts, heads and per-task data."""

    body: nn.Module
    base: dict[str, torch.Tensor]
    experts: list[dict[str, torch.Tensor]]  # task vectors of the body
    heads: list[nn.Linear]
    val: list[Split]
    test: list[Split]
    names: list[str]
    expert_val: list[float] = field(default_factory=list)
    expert_test: list[float] = field(default_factory=list)
    base_test: list[float] = field(default_factory=list)
    lora_experts: list[dict[str, torch.Tensor]] = field(default_factory=list)  # product-space ΔW = s·B·A
    # each LoRA expert's factors per body weight: (A, s·B), for the merges in the adapters' own space
    lora_factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    fishers: list[dict[str, torch.Tensor]] = field(default_factory=list)  # diagonal Fisher of each expert
    lora_fishers: list[dict[str, torch.Tensor]] = field(default_factory=list)
    lora_val: list[float] = field(default_factory=list)
    lora_test: list[float] = field(default_factory=list)

    @torch.no_grad()
    def accuracy(self, params: Mapping[str, torch.Tensor], task: int, split: str = "test") -> float:
        data = (self.test if split == "test" else self.val)[task]
        logits = self.heads[task](functional_call(self.body, dict(params), (data.x,)))
        return float((logits.argmax(1) == data.y).float().mean())

    def accuracies(self, delta: Mapping[str, torch.Tensor], split: str) -> list[float]:
        params = {k: self.base[k] + delta[k] for k in self.base}
        return [self.accuracy(params, t, split) for t in range(len(self.names))]


def build_body(hidden: int, g: torch.Generator) -> nn.Sequential:
    body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    for m in body:
        if isinstance(m, nn.Linear):
            bound = 1.0 / m.in_features**0.5
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=g)
                m.bias.uniform_(-bound, bound, generator=g)
    return body


def linear(fan_in: int, out: int, g: torch.Generator) -> nn.Linear:
    lin = nn.Linear(fan_in, out)
    bound = 1.0 / fan_in**0.5
    with torch.no_grad():
        lin.weight.uniform_(-bound, bound, generator=g)
        lin.bias.uniform_(-bound, bound, generator=g)
    return lin


def zero_shot_head(pre_head: nn.Linear, classes: int) -> nn.Linear:
    """The base's own digit classifier read through the task's label map: class c's weights and bias are
    the mean of those of the digits d with d mod ``classes`` = c (the identity for 10 classes)."""
    head = nn.Linear(pre_head.in_features, classes)
    with torch.no_grad():
        for c in range(classes):
            digits = [d for d in range(10) if d % classes == c]
            head.weight[c] = pre_head.weight[digits].mean(0)
            head.bias[c] = pre_head.bias[digits].mean()
    return head


def train_lora_expert(
    body: nn.Module,
    head: nn.Linear,
    base: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: Config,
    seed: int,
    task: int,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A peft LoRA expert (rank ``lora_rank``, α = ``lora_alpha``, on both body layers; biases frozen) of a
    copy of the base body, trained with the task's frozen head; returned as the body's task vector in
    product space: ΔW = (α/r)·B·A from peft's own ``get_delta_weight``, zero for the biases; and its
    factors per weight, (A, (α/r)·B)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    body = copy.deepcopy(body)
    body.load_state_dict(dict(base))
    lora_cfg = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0
    )
    with torch.random.fork_rng():  # peft draws A's initialisation from the global generator
        torch.manual_seed(int(generator(seed, 108, task).initial_seed()))
        model = get_peft_model(nn.Sequential(body, head), lora_cfg)
    train(model, x, y, cfg.finetune_epochs, cfg.lora_lr, cfg.batch_size, generator(seed, 109, task))
    delta = {k: torch.zeros_like(v) for k, v in base.items()}
    factors = {}
    with torch.no_grad():
        for target in LORA_TARGETS:
            layer = model.get_submodule(f"base_model.model.{target}")
            assert isinstance(layer, LoraLinear), type(layer)
            delta[f"{target[2:]}.weight"] = layer.get_delta_weight("default").detach().clone()
            a = cast(torch.Tensor, layer.lora_A["default"].weight).detach().clone()
            b = cast(torch.Tensor, layer.lora_B["default"].weight).detach()
            factors[f"{target[2:]}.weight"] = (a, layer.scaling["default"] * b)
    return delta, factors


FISHER_EXAMPLES = 512  # training examples per expert in its diagonal Fisher


def diagonal_fisher(
    body: nn.Module, head: nn.Linear, params: Mapping[str, torch.Tensor], x: torch.Tensor, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of the body's parameters at ``params`` (Matena & Raffel 2022): the mean over the
    examples of (∂ log p(ŷ | x) / ∂θ)², ŷ drawn once per example from the model's own p(· | x) (their
    Monte-Carlo estimate of the expectation over labels), per-example gradients by ``torch.func``."""
    from torch.func import grad, vmap

    p = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        probs = torch.softmax(head(functional_call(body, p, (x,))), 1)
        y_hat = torch.multinomial(probs, 1, generator=g).squeeze(1)

    def log_p(q: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = head(functional_call(body, q, (xi[None],)))[0]
        return torch.log_softmax(logits, 0).gather(0, yi[None])[0]

    total = {k: torch.zeros_like(v) for k, v in p.items()}
    for i in range(0, len(x), 128):
        grads = vmap(grad(log_p), in_dims=(None, 0, 0))(p, x[i : i + 128], y_hat[i : i + 128])
        for k in total:
            total[k] += grads[k].square().sum(0)
    return {k: v / len(x) for k, v in total.items()}


UPRIGHT = Config(hidden=128, pretrain="upright", pretrain_epochs=20, finetune_epochs=30, finetune_lr=3e-3)


def pretraining_data(
    cfg: Config, x: torch.Tensor, y: torch.Tensor, perms: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base's pre-training set: ``upright``, the training images as they are; ``broad``, the first
    ``pretrain_fraction`` of them in every task's view and as they are, labelled by the digit."""
    if cfg.pretrain == "upright":
        return x, y
    if cfg.pretrain != "broad":
        raise ValueError(f"unknown pre-training regime {cfg.pretrain!r}: broad or upright")
    n = max(1, round(cfg.pretrain_fraction * len(y)))
    views = [s.transform(x[:n], p) for s, p in zip(TASKS[: cfg.tasks], perms, strict=True)]
    return torch.cat([x[:n], *views]), y[:n].repeat(len(views) + 1)


def build_suite(cfg: Config, seed: int) -> Suite:
    """Pre-train the base body, derive each task's fixed head, fine-tune one expert body per task."""
    x_tr, y_tr, x_te, y_te = digits_split(0.3, generator(seed, 100))
    x_va, y_va = x_tr[: cfg.val_size], y_tr[: cfg.val_size]
    x_tr, y_tr = x_tr[cfg.val_size :], y_tr[cfg.val_size :]
    body = build_body(cfg.hidden, generator(seed, 101))
    pre_head = linear(cfg.hidden, 10, generator(seed, 102))
    specs = TASKS[: cfg.tasks]
    perms = [pixel_permutation(s.permuted_fraction, generator(seed, 104, t)) for t, s in enumerate(specs)]
    x_pre, y_pre = pretraining_data(cfg, x_tr, y_tr, perms)
    train(
        nn.Sequential(body, pre_head),
        x_pre,
        y_pre,
        cfg.pretrain_epochs,
        cfg.lr,
        cfg.batch_size,
        generator(seed, 103),
    )
    base = {k: v.detach().clone() for k, v in body.state_dict().items()}
    suite = Suite(body, base, [], [], [], [], [s.name for s in specs])
    for t, spec in enumerate(specs):
        perm = perms[t]
        xt, yt = spec.transform(x_tr, perm), spec.labels(y_tr)
        suite.val.append(Split(spec.transform(x_va, perm), spec.labels(y_va)))
        suite.test.append(Split(spec.transform(x_te, perm), spec.labels(y_te)))
        head = zero_shot_head(pre_head, spec.classes)
        head.requires_grad_(False)
        suite.heads.append(head)
        body.load_state_dict(base)
        train(
            nn.Sequential(body, head),
            xt,
            yt,
            cfg.finetune_epochs,
            cfg.finetune_lr,
            cfg.batch_size,
            generator(seed, 107, t),
        )
        suite.experts.append({k: v.detach() - base[k] for k, v in body.state_dict().items()})
        xf = xt[:FISHER_EXAMPLES]
        full = {k: base[k] + suite.experts[t][k] for k in base}
        suite.fishers.append(diagonal_fisher(body, head, full, xf, generator(seed, 110, t)))
        if cfg.lora:
            body.load_state_dict(base)
            lora_delta, lora_factors = train_lora_expert(body, head, base, xt, yt, cfg, seed, t)
            suite.lora_experts.append(lora_delta)
            suite.lora_factors.append(lora_factors)
            low = {k: base[k] + suite.lora_experts[t][k] for k in base}
            suite.lora_fishers.append(diagonal_fisher(body, head, low, xf, generator(seed, 111, t)))
    body.load_state_dict(base)
    body.eval()
    for t in range(len(specs)):
        suite.expert_val.append(suite.accuracies(suite.experts[t], "val")[t])
        suite.expert_test.append(suite.accuracies(suite.experts[t], "test")[t])
        if cfg.lora:
            suite.lora_val.append(suite.accuracies(suite.lora_experts[t], "val")[t])
            suite.lora_test.append(suite.accuracies(suite.lora_experts[t], "test")[t])
    suite.base_test = suite.accuracies({k: torch.zeros_like(v) for k, v in base.items()}, "test")
    return suite
