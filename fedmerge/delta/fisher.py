"""The diagonal (empirical) Fisher of a model's parameters, computed by a client beside its delta.

    F_j = (1/n) Σ_i (∂ ℓ_i / ∂θ_j)²,    ℓ_i = −log p(y_i | x_i; θ) of example i (its loss)

at the fine-tuned parameters θ, one backward pass per example (Matena & Raffel, "Merging Models with
Fisher-Weighted Averaging", NeurIPS 2022, §2). The paper's estimator draws y from the model's own
p(· | x); this is its *empirical* variant with the observed labels (their §2 discusses both), which
needs only a loss, so any task that can score one example computes it. ``fedmerge.aggregators.fisher``
merges with it; a floating tensor of the model that is not a trainable parameter (a buffer) gets F = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedmerge.errors import ConfigError


def diagonal_fisher(
    model: nn.Module,
    example_loss: Callable[[nn.Module, int], torch.Tensor],
    examples: Sequence[int],
    names: Sequence[str],
) -> dict[str, torch.Tensor]:
    """F over ``names`` (the delta's tensors, state-dict names of ``model``): the mean over ``examples``
    of the squared gradient of ``example_loss(model, i)``, a scalar. fp32, on the CPU."""
    if not examples:
        raise ConfigError("a diagonal Fisher needs at least one example")
    params = dict(model.named_parameters())
    state = model.state_dict()
    unknown = [n for n in names if n not in state]
    if unknown:
        raise ConfigError(f"the model has no tensors {unknown[:5]} (a Fisher is over the delta's names)")
    total = {n: torch.zeros(state[n].shape, dtype=torch.float32) for n in names}
    tracked = [n for n in names if n in params and params[n].requires_grad]
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it will be merged
    try:
        for i in examples:
            model.zero_grad(set_to_none=True)
            loss = example_loss(model, i)
            if loss.dim() != 0:
                raise ConfigError(f"example_loss must return a scalar, got shape {tuple(loss.shape)}")
            loss.backward()
            for n in tracked:
                grad = params[n].grad
                if grad is not None:
                    total[n] += grad.detach().float().cpu().square()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {n: t / len(examples) for n, t in total.items()}
