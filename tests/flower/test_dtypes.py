"""Every floating dtype a real checkpoint uses (fp32, bf16, fp16) through the round engine: the
``"arrays"`` convention of :mod:`fedmerge.flower.records` (bf16 widened to fp32, named in
``"fedmerge.dtypes"``), dense replies judged against the widened base, versions that keep the base's
dtype, and replies whose bytes do not match their header rejected while the round goes on."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedmerge.flower.records import (
    DTYPES_RECORD,
    DtypeRecordError,
    dtypes_of,
    narrow_from_numpy,
    widen_for_numpy,
)


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "half": torch.randn(4, generator=g).to(torch.float16),
        "full": torch.randn(2, 2, generator=g),
        "steps": torch.arange(3),
    }


def test_widening_is_lossless_and_names_only_the_widened_tensors() -> None:
    weights = _weights()
    wide, dtypes = widen_for_numpy(weights)
    assert dtypes == {"bf": "bfloat16"}
    assert wide["bf"].dtype == torch.float32 and wide["half"].dtype == torch.float16
    assert wide["full"] is weights["full"] and wide["steps"] is weights["steps"]
    # through Flower's own Array (numpy) and back: bit-identical bf16
    record = ArrayRecord(wide)
    back = {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}
    narrowed = narrow_from_numpy(back, dtypes_of(ConfigRecord(dtypes), back))
    for name, tensor in weights.items():
        assert narrowed[name].dtype == tensor.dtype
        assert torch.equal(narrowed[name], tensor), name


def test_nothing_widened_means_no_record() -> None:
    weights = {k: v for k, v in _weights().items() if k != "bf"}
    assert widen_for_numpy(weights)[1] == {}
    assert dtypes_of(None, weights) == {}


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"ghost": "bfloat16"}, "'ghost', which is not a tensor"),
        ({"bf": "float8"}, "dtype 'float8'"),
        ({"bf": 3}, "dtype '3'"),
    ],
)
def test_a_bad_dtypes_record_is_one_clear_error(record: dict[str, object], match: str) -> None:
    with pytest.raises(DtypeRecordError, match=match) as info:
        dtypes_of(ConfigRecord(record), _weights())  # type: ignore[arg-type]
    assert DTYPES_RECORD in str(info.value)
