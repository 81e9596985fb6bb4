"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data").

    τ = Σ_i n_i τ_i / Σ_i n_i        (n_i = the client's number of examples, its ``weight``)

Applied to task vectors this equals averaging the clients' weights. Streams in O(P).
"""

from __future__ import annotations

from typing import ClassVar

from fedmerge.aggregators.base import register
from fedmerge.aggregators.linear import LinearAggregator


@register
class FedAvg(LinearAggregator):
    name: ClassVar[str] = "fedavg"
    averaging: ClassVar[bool] = True

    def __init__(self, **common: object) -> None:
        super().__init__(scaling=1.0, normalize=True, **common)

    @property
    def dp_calibrated(self) -> bool:
        return True  # the mean of the clipped deltas (with unit weights under DP)
