"""Where a client trains: ``client-device`` in the run config, resolved on the node."""

from __future__ import annotations

import pytest
import torch

from fedmerge.errors import ConfigError, FedMergeError
from fedmerge.flower.client.reply import training_device
from fedmerge.flower.config import parse_run_config


def test_auto_follows_the_node_hardware() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert training_device("auto").type == expected
    assert training_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this node has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(FedMergeError, match=r"sees no GPU.*num-gpus"):
        training_device("cuda")


def test_unknown_device_is_rejected_by_the_run_config_and_the_client() -> None:
    with pytest.raises(ConfigError, match="client-device='tpu'"):
        parse_run_config({"client-device": "tpu"})
    with pytest.raises(FedMergeError, match="'tpu'"):
        training_device("tpu")
    assert parse_run_config({"client-device": "cpu"}).training.client_device == "cpu"
