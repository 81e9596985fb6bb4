"""The node's own copy of the base, found by weights digest (``downlink-base-at-nodes``).

Institutions that fine-tune a public checkpoint hold it already; shipping it to them in the first
round costs the network as much as a dense round. With ``downlink-base-at-nodes = true`` the server
names a node's first base by its weights digest (``base-digest`` in ``"fedmerge.config"``:
:func:`~fedmerge.flower.downlink.weights_digest`, sha256 over every tensor's name, dtype, shape and
bytes) and sends no weights. The node looks for a copy with exactly that digest, in this order:

1. the process's base cache (:data:`~fedmerge.flower.client.node_state.BASES`: another node of this
   process has it);
2. its node-state directory (:class:`~fedmerge.flower.client.node_state.NodeFiles`: kept by an
   earlier node or run on this host; the bytes are hashed again);
3. ``base-path`` (node config): a Hugging Face model directory (``model.safetensors`` or its shards)
   or one ``.safetensors`` file, every tensor under its stored name and dtype — the checkpoint the
   server's store was initialised from (``fedmerge init --base``);
4. a base the ClientApp builds (``build``; fedmerge's own ClientApp: its task's pretrained base).

A copy counts only when its digest is the one named: a node never trains on another base. When none
matches, :func:`own_copy` raises :class:`MissingBase` saying what it tried, and the server sends the
weights in the node's next message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmerge.delta.hf import HFModelError, load_hf_state_dict
from fedmerge.delta.state_dict import StateDict
from fedmerge.errors import ConfigError, FedMergeError
from fedmerge.flower.client.node_state import BASES, NodeFiles, NodeStateError, node_files, unpack_tensors
from fedmerge.flower.downlink import weights_digest

BASE_DIGEST_KEY = "base-digest"  # "fedmerge.config": the weights digest of the base the node holds itself
BASE_PATH_KEY = "base-path"  # node config: the node's copy of the base checkpoint

# base-path → (its files' (path, size, mtime) when read, their digest): a checkpoint is read again
# only when it changed, so a node whose copy is another model learns so once per process
_PATH_DIGESTS: dict[str, tuple[tuple[tuple[str, int, int], ...], str]] = {}


class MissingBase(FedMergeError, RuntimeError):
    """The node was asked to train on a base version whose weights it does not hold."""


@dataclass(frozen=True)
class FoundBase:
    """A copy of the named base: its tensors (shared with the process's cache when ``packed`` is
    set: not to be modified) and where it came from."""

    tensors: StateDict
    packed: bytes | None
    source: str


def _stamp(path: Path) -> tuple[tuple[str, int, int], ...]:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
    return tuple((str(p), (st := os.stat(p)).st_size, st.st_mtime_ns) for p in files)


def verified_base_file(files: NodeFiles, digest: str) -> tuple[StateDict, bytes] | None:
    """(tensors, packed bytes) of the base file ``digest`` in the node-state directory when its bytes
    unpack to weights with that digest; None when it is missing, damaged or altered."""
    packed = files.read_base(digest)
    if packed is None:
        return None
    try:
        tensors = unpack_tensors(packed)
    except NodeStateError:
        return None
    return (tensors, packed) if tensors and weights_digest(tensors) == digest else None


def from_checkpoint(path_value: Any, digest: str) -> tuple[StateDict | None, str]:
    """The tensors of the checkpoint at ``base-path`` when their digest is ``digest``, else (None,
    why not). A path that is not a readable safetensors checkpoint is a :class:`ConfigError`."""
    path = Path(str(path_value)).expanduser()
    if not path.exists():
        raise ConfigError(f"node config base-path={str(path_value)!r} does not exist")
    key = str(path.resolve())
    stamp = _stamp(path)
    known = _PATH_DIGESTS.get(key)
    if known is not None and known[0] == stamp and known[1] != digest:
        return None, f"base-path {path} holds weights digest {known[1][:12]}…"
    try:
        tensors = load_hf_state_dict(path)
    except HFModelError as exc:
        raise ConfigError(f"node config base-path={str(path_value)!r}: {exc}") from None
    found = weights_digest(tensors)
    _PATH_DIGESTS[key] = (stamp, found)
    if found != digest:
        return None, f"base-path {path} holds weights digest {found[:12]}…"
    return tensors, ""


def find_base(
    digest: str,
    node_config: Mapping[str, Any],
    build: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> tuple[FoundBase | None, list[str]]:
    """The node's own copy of the base with weights digest ``digest`` (module docstring: cache,
    node-state directory, ``base-path``, ``build``), or None, and what was tried without success."""
    cached = BASES.get(digest)
    if cached is not None:
        return FoundBase(cached[0], cached[1], "this process's base cache"), []
    tried = ["not in this process's base cache"]
    files = node_files(node_config)
    from_files = verified_base_file(files, digest)
    if from_files is not None:
        return FoundBase(from_files[0], None, f"node-state directory {files.root}"), tried
    tried.append(f"not in node-state directory {files.root}")
    path = node_config.get(BASE_PATH_KEY)
    if path:
        from_path, why = from_checkpoint(path, digest)
        if from_path is not None:
            return FoundBase(from_path, None, f"base-path {path}"), tried
        tried.append(why)
    else:
        tried.append("no base-path in the node config")
    if build is not None:
        built = {k: v.detach().cpu().contiguous() for k, v in build().items()}
        found = weights_digest(built)
        if found == digest:
            return FoundBase(built, None, "the ClientApp's own base"), tried
        tried.append(f"the ClientApp's own base has weights digest {found[:12]}…")
    return None, tried


def own_copy(
    digest: str,
    version_id: str,
    node_config: Mapping[str, Any],
    build: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> FoundBase:
    """:func:`find_base`, or :class:`MissingBase` naming base ``version_id`` and what was tried."""
    found, tried = find_base(digest, node_config, build)
    if found is None:
        raise MissingBase(
            f"the server names base {version_id!r} by weights digest {digest[:12]}… "
            f"(downlink-base-at-nodes) but this node holds no copy of it ({'; '.join(tried)}); it sends "
            "the weights in the next round"
        )
    return found
