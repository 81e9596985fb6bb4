"""The worked LoRA example's legs in ``bench rounds``: the dense reference stays dense whatever codec the
example ships (its run config is the base of both legs)."""

from __future__ import annotations

from fedmerge.flower.config import parse_run_config
from fedmerge_bench._lora_example import DENSE, example_config


def test_the_dense_leg_overrides_every_codec_key_the_example_ships() -> None:
    shipped = parse_run_config(example_config())
    dense = parse_run_config({**example_config(), **DENSE})
    codec = dense.codec.config()
    assert (codec.rank, codec.density, codec.values, codec.deflate) == (0, 1.0, "fp32", False)
    assert not dense.downlink.compressed  # full weights every round
    # the shipped codec compresses both ways, so the legs differ
    assert shipped.codec.config() != codec and shipped.downlink.compressed
