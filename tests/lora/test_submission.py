"""Submission → task vector (fedmerge.submission): peft archives, LoRA completeness and ranks,
the one base-check policy, and tar members that would expand on extraction."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from fedmerge.codec import CodecConfig, PackageMeta, encode_package
from fedmerge.errors import InvalidSubmission
from fedmerge.submission import (
    StaleOrInvalid,
    check_package_base,
    package_to_task_vector,
    peft_tar_to_task_vector,
)

BASE = {
    "l1.weight": torch.zeros(16, 8),
    "l1.bias": torch.zeros(16),
    "step": torch.zeros((), dtype=torch.int64),
}
A, B = "base_model.model.l1.lora_A.weight", "base_model.model.l1.lora_B.weight"


def _tar(path: Path, members: dict[str, bytes], sparse: tuple[str, int] | None = None) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"adapter/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if sparse is not None:  # rewrite one member's header as GNU sparse ('S') declaring a huge size
        raw = bytearray(path.read_bytes())
        name, size = sparse
        off = raw.find(f"adapter/{name}".encode())
        raw[off + 156 : off + 157] = b"S"
        raw[off + 483 : off + 495] = f"{size:011o}\0".encode()  # realsize of the GNU sparse header
        raw[off + 148 : off + 156] = b"        "
        chk = sum(raw[off : off + 512])
        raw[off + 148 : off + 156] = f"{chk:06o}\0 ".encode()
        path.write_bytes(bytes(raw))
    return path


def _weights(a_rank: int = 2, b_rank: int = 2) -> bytes:
    g = torch.Generator().manual_seed(0)
    return save({A: torch.randn(a_rank, 8, generator=g), B: torch.randn(16, b_rank, generator=g)})


CONFIG = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}).encode()


@pytest.mark.parametrize(
    "config",
    [b"{}", b"[1, 2]", b'{"r": 2, "lora_alpha": {}}', b'{"r": "2", "lora_alpha": 4}', b"not json"],
    ids=["empty", "list", "alpha-dict", "r-string", "not-json"],
)
def test_malformed_adapter_config_is_an_invalid_submission(tmp_path: Path, config: bytes) -> None:
    path = _tar(tmp_path / "a.tar", {"adapter_config.json": config, "adapter_model.safetensors": _weights()})
    with pytest.raises(InvalidSubmission, match=r"adapter_config\.json"):
        peft_tar_to_task_vector(path, BASE)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (b"{}", r"lacks the required key 'lora_alpha' \(a peft LoRA config names r, lora_alpha"),
        (b'{"lora_alpha": 4}', r"lacks the required key 'r'"),
        (b'{"r": 2, "lora_alpha": 4, "use_rslora": "yes"}', r"'use_rslora' must be true or false, got 'yes'"),
    ],
    ids=["empty", "no-rank", "rslora-string"],
)
def test_adapter_config_messages_say_what_is_missing(tmp_path: Path, config: bytes, message: str) -> None:
    path = _tar(tmp_path / "a.tar", {"adapter_config.json": config, "adapter_model.safetensors": _weights()})
    with pytest.raises(InvalidSubmission, match=message):
        peft_tar_to_task_vector(path, BASE)


def test_weights_that_are_not_safetensors_are_an_invalid_submission(tmp_path: Path) -> None:
    path = _tar(tmp_path / "a.tar", {"adapter_config.json": CONFIG, "adapter_model.safetensors": b"junk" * 9})
    with pytest.raises(InvalidSubmission, match="not a safetensors file"):
        peft_tar_to_task_vector(path, BASE)


def test_rank_mismatch_names_the_module_and_both_ranks(tmp_path: Path) -> None:
    path = _tar(
        tmp_path / "a.tar", {"adapter_config.json": CONFIG, "adapter_model.safetensors": _weights(3, 2)}
    )
    with pytest.raises(InvalidSubmission, match=r"module 'base_model.model.l1'.*rank 3 but lora_B .*rank 2"):
        peft_tar_to_task_vector(path, BASE)


def test_lone_lora_b_is_refused(tmp_path: Path) -> None:
    weights = save({B: torch.ones(16, 2)})
    path = _tar(tmp_path / "a.tar", {"adapter_config.json": CONFIG, "adapter_model.safetensors": weights})
    with pytest.raises(InvalidSubmission, match=r"has no matching .*lora_A"):
        peft_tar_to_task_vector(path, BASE)


def test_a_valid_adapter_gives_delta_w_and_zero_change_elsewhere(tmp_path: Path) -> None:
    path = _tar(tmp_path / "a.tar", {"adapter_config.json": CONFIG, "adapter_model.safetensors": _weights()})
    tau = peft_tar_to_task_vector(path, BASE)
    assert set(tau) == {"l1.weight", "l1.bias"} and torch.count_nonzero(tau["l1.bias"]) == 0
    assert torch.count_nonzero(tau["l1.weight"]) > 0


def test_sparse_member_is_refused_without_writing_anything(tmp_path: Path) -> None:
    path = _tar(
        tmp_path / "a.tar",
        {"adapter_config.json": CONFIG, "adapter_model.safetensors": _weights()},
        sparse=("adapter_model.safetensors", 1 << 30),
    )
    assert path.stat().st_size < 16 << 10
    with pytest.raises(InvalidSubmission, match="is a sparse file"):
        peft_tar_to_task_vector(path, BASE)


def test_declared_size_above_what_the_base_can_need_is_refused(tmp_path: Path) -> None:
    big = b"\0" * (256 << 10)  # the base has 144 entries: an adapter needs a few KiB at most
    path = _tar(tmp_path / "a.tar", {"adapter_config.json": CONFIG, "adapter_model.safetensors": big})
    with pytest.raises(InvalidSubmission, match="declares 262144 bytes"):
        peft_tar_to_task_vector(path, BASE)


def _lora_pkg(
    tmp_path: Path, tensors: dict[str, torch.Tensor], base_id: str = "v1", h: str = "h" * 64
) -> Path:
    meta = PackageMeta("c", 0, base_id, h, kind="lora", lora_rank=2, lora_alpha=4.0)
    path = tmp_path / "p.bin"
    lossless = CodecConfig(sparsify="none", values="fp32", error_feedback=False)
    path.write_bytes(encode_package(tensors, lossless, meta=meta).data)
    return path


def test_lora_package_rank_mismatch_and_lone_factor_and_task_vector_names(tmp_path: Path) -> None:
    kw = {"base_id": "v1", "base_hash": "h" * 64}
    bad_rank = _lora_pkg(tmp_path, {A: torch.ones(3, 8), B: torch.ones(16, 2)})
    with pytest.raises(
        InvalidSubmission, match=r"lora_A \(3, 8\) has rank 3 but lora_B \(16, 2\) has rank 2"
    ):
        package_to_task_vector(bad_rank, BASE, 1 << 20, **kw)
    lone = _lora_pkg(tmp_path, {B: torch.ones(16, 2)})
    with pytest.raises(InvalidSubmission, match="has lora_B but no lora_A"):
        package_to_task_vector(lone, BASE, 1 << 20, **kw)
    names = _lora_pkg(tmp_path, {"l1.weight": torch.ones(16, 8)})
    with pytest.raises(InvalidSubmission, match="not a lora_A/lora_B factor"):
        package_to_task_vector(names, BASE, 1 << 20, **kw)
    ok = _lora_pkg(tmp_path, {A: torch.ones(2, 8), B: torch.ones(16, 2)})
    tau = package_to_task_vector(ok, BASE, 1 << 20, **kw)
    torch.testing.assert_close(tau["l1.weight"], torch.full((16, 8), 4.0))  # (4/2)·B·A = 2·2


def test_one_base_policy_refuses_empty_and_stale_fields_naming_both_hashes() -> None:
    check_package_base("v1", "a" * 64, "v1", "a" * 64)
    for meta_id, meta_hash in (("", "a" * 64), ("v1", ""), ("", "")):
        with pytest.raises(StaleOrInvalid, match="names no base"):
            check_package_base(meta_id, meta_hash, "v1", "a" * 64)
    with pytest.raises(StaleOrInvalid, match=f"expected hash {'a' * 64}, received {'b' * 64}"):
        check_package_base("v1", "b" * 64, "v1", "a" * 64)


def test_coo_package_declaring_a_huge_tensor_is_refused_against_the_base(tmp_path: Path) -> None:
    from fedmerge.codec.errors import PackageError
    from fedmerge.v1 import delta_pb2
    from fedmerge_testing.hostile import mutate

    meta = PackageMeta("c", 0, "v1", "h" * 64)
    data = encode_package({"l1.bias": torch.ones(16)}, CodecConfig(), meta=meta).data

    def grow(p: delta_pb2.DeltaPackage) -> None:
        del p.tensors[0].shape[:]
        p.tensors[0].shape.append(1 << 28)

    path = tmp_path / "huge.bin"
    path.write_bytes(mutate(data, grow))
    with pytest.raises(PackageError, match=r"above max_tensor_numel|declares shape"):
        package_to_task_vector(path, BASE, 1 << 20, base_id="v1", base_hash="h" * 64)
