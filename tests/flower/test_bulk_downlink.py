"""The rounds' bulk downlink: a node that needs the round's base downloads it from the ServerApp's
bulk endpoint (``ExpertIntake.GetVersion`` under its round token) instead of receiving Flower's
``"arrays"``. Real :class:`BulkEndpoint` on localhost, real store, real ``build_messages`` and the
client's real ``base_weights``; a relay server in the test cuts or alters a real stream.

Covered: the downloaded weights are bit-identical to ``store.materialize`` (a root and a version
with a task vector); ``bulk-downlink`` off, or a base not above ``bulk-threshold-bytes``, keeps
``"arrays"``; a forged token, a node the base was not offered to, another version, a closed round
are refused; a stream cut short, a digest mismatch and a reference that is not the round's base are
errors of the node; a round in simulation with ``bulk-downlink = true`` commits, and a node whose
download fails is recorded with its reason while the round goes on; a round with real SuperLink and
SuperNodes in which both new nodes fetch the base through the bulk channel commits (slow)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedmerge.errors import ConfigError
from fedmerge.flower.client.bulk import (
    BASE_DIGEST_KEY,
    BASE_ID_KEY,
    BASE_SIZE_KEY,
    CHUNK_BYTES,
    TOKEN_KEY,
    BaseReference,
    BulkDownloadFailed,
    BulkTarget,
    download_base,
)
from fedmerge.flower.client.reply import BASE_META, base_weights
from fedmerge.flower.config import parse_run_config
from fedmerge.flower.records import ARRAYS_RECORD, FEDMERGE_RECORD
from fedmerge.flower.server.bulk_endpoint import BulkEndpoint, make_token
from fedmerge.flower.server.federation import build_messages
from fedmerge.store import ModelStore, Version
from fedmerge.store.safetensors_format import encode_header
from fedmerge.v1 import intake_pb2, intake_pb2_grpc
from fedmerge_testing.hostile import FlowerRound

sys.path.insert(0, str(Path(__file__).parent))

from test_deployment import deployment  # noqa: F401  (fixture)
from test_large_rounds import (
    InsecureDeployment,
    bulk_run_config,
    committed_rounds,
    insecure_deployment,  # noqa: F401  (fixture)
)

ROUND, ATTEMPT, NODE = 1, 0, 7


@pytest.fixture(autouse=True)
def run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run a ServerApp process belongs to (Flower's ``Message`` reads it when built)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)  # the ServerApp sends from node 0
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture
def fr(tmp_path: Path) -> FlowerRound:
    return FlowerRound.open(tmp_path / "store", **{"bulk-address": "127.0.0.1:0", "bulk-downlink": True})


@pytest.fixture
def endpoint(tmp_path: Path, fr: FlowerRound) -> Iterator[BulkEndpoint]:
    ep = BulkEndpoint(
        tmp_path / "spool",
        "127.0.0.1:0",
        max_bytes=64 << 20,
        reserve_bytes=0,
        threshold=0,
        store_root=fr.root,
    )
    ep.start()
    ep.open_round(ROUND, ATTEMPT)
    yield ep
    ep.stop()


def context(node: int = NODE) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def train_for(
    fr: FlowerRound, ep: BulkEndpoint, node: int = NODE, base: Version | None = None, **cfg: Any
) -> Message:
    """The train message ``build_messages`` makes for a node that does not hold the base."""
    run_cfg = parse_run_config(
        {"store": str(fr.root), "bulk-address": "127.0.0.1:0", "bulk-downlink": True, **cfg}
    )
    base = base or fr.base
    with ModelStore.open(fr.root) as store:
        weights = store.weights_view(base)
        (message,), _ = build_messages(
            [node], run_cfg, ROUND, base, weights, set(),
            node_settings=lambda n: ep.settings_for(ROUND, ATTEMPT, n),
        )  # fmt: skip
    return message


def materialized(root: Path, base: Version) -> dict[str, torch.Tensor]:
    with ModelStore.open(root) as store:
        return store.materialize(base)


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), name


def commit_task_vector(fr: FlowerRound) -> Version:
    """A version on top of the base whose weights are root + τ (so materialising sums a chain)."""
    gen = torch.Generator().manual_seed(3)
    delta = {
        n: torch.randn(t.shape, generator=gen) * 1e-2 for n, t in fr.weights.items() if t.is_floating_point()
    }
    with ModelStore.open(fr.root) as store:
        return store.commit(
            delta, parents=[fr.base.id], method="test", params={}, contributors=[], round=None, metrics={},
            privacy=None,
        )  # fmt: skip


def ref_and_target(message: Message) -> tuple[BaseReference, BulkTarget]:
    settings = message.content.config_records[FEDMERGE_RECORD]
    ref = BaseReference.from_settings(settings)
    target = BulkTarget.from_settings(settings)
    assert ref is not None and target is not None
    return ref, target


# ------------------------------------------------------------------------------ the right base


def test_new_node_gets_a_reference_and_downloads_the_base_bit_identical(
    fr: FlowerRound, endpoint: BulkEndpoint
) -> None:
    message = train_for(fr, endpoint)
    assert ARRAYS_RECORD not in message.content.array_records
    assert message.content.config_records[FEDMERGE_RECORD][BASE_ID_KEY] == fr.base.id
    ctx = context()
    got = base_weights(message, ctx)
    assert_bit_identical(got, materialized(fr.root, fr.base))
    assert ctx.state.config_records[BASE_META]["version-id"] == fr.base.id
    assert_bit_identical(base_weights(message, ctx), got)  # held now: no second download needed


def test_a_version_with_a_task_vector_downloads_as_materialize(
    fr: FlowerRound, endpoint: BulkEndpoint
) -> None:
    version = commit_task_vector(fr)
    message = train_for(fr, endpoint, base=version)
    want = materialized(fr.root, version)
    assert not all(torch.equal(want[n], fr.weights[n]) for n in want)  # the chain changed the weights
    assert_bit_identical(base_weights(message, context()), want)


def test_without_the_switch_or_below_the_threshold_the_base_goes_in_arrays(
    fr: FlowerRound, endpoint: BulkEndpoint, tmp_path: Path
) -> None:
    off = train_for(fr, endpoint, **{"bulk-downlink": False})
    assert ARRAYS_RECORD in off.content.array_records
    assert BASE_ID_KEY not in off.content.config_records[FEDMERGE_RECORD]
    big = BulkEndpoint(
        tmp_path / "spool2", "127.0.0.1:0", max_bytes=1 << 20, reserve_bytes=0, threshold=1 << 40,
        store_root=fr.root,
    )  # fmt: skip
    with big:
        big.open_round(ROUND, ATTEMPT)
        below = train_for(fr, big)
    assert ARRAYS_RECORD in below.content.array_records
    assert BASE_ID_KEY not in below.content.config_records[FEDMERGE_RECORD]


def test_bulk_downlink_needs_the_bulk_endpoint() -> None:
    with pytest.raises(ConfigError, match="bulk-downlink = true needs the bulk endpoint"):
        parse_run_config({"bulk-downlink": True})


# ------------------------------------------------------------------------------- refusals


def test_a_forged_token_is_refused(fr: FlowerRound, endpoint: BulkEndpoint, tmp_path: Path) -> None:
    ref, target = ref_and_target(train_for(fr, endpoint))
    forged = BulkTarget(target.address, make_token(b"not the secret" * 3, ROUND, ATTEMPT, NODE), 0)
    with pytest.raises(BulkDownloadFailed, match="UNAUTHENTICATED"):
        download_base(ref, forged, tmp_path / "base.safetensors")
    assert not (tmp_path / "base.safetensors").exists()


def test_a_node_the_base_was_not_offered_to_is_refused(
    fr: FlowerRound, endpoint: BulkEndpoint, tmp_path: Path
) -> None:
    ref, target = ref_and_target(train_for(fr, endpoint))
    other = BulkTarget(target.address, make_token(endpoint.secret, ROUND, ATTEMPT, NODE + 1), 0)
    with pytest.raises(BulkDownloadFailed, match=r"PERMISSION_DENIED.*node 8 was not offered"):
        download_base(ref, other, tmp_path / "base.safetensors")


def test_another_version_is_refused(fr: FlowerRound, endpoint: BulkEndpoint, tmp_path: Path) -> None:
    version = commit_task_vector(fr)
    ref, target = ref_and_target(train_for(fr, endpoint))  # the round's base is fr.base
    wrong = BaseReference(version.id, version.content_hash, ref.digest, ref.size)
    with pytest.raises(BulkDownloadFailed, match=r"PERMISSION_DENIED.*serves only the full weights"):
        download_base(wrong, target, tmp_path / "base.safetensors")


def test_a_closed_round_serves_nothing(fr: FlowerRound, endpoint: BulkEndpoint, tmp_path: Path) -> None:
    ref, target = ref_and_target(train_for(fr, endpoint))
    endpoint.close_round(ROUND, ATTEMPT)
    with pytest.raises(BulkDownloadFailed, match=r"FAILED_PRECONDITION.*closed"):
        download_base(ref, target, tmp_path / "base.safetensors")


def test_a_reference_to_another_base_than_the_message_trains_on_is_an_error(
    fr: FlowerRound, endpoint: BulkEndpoint
) -> None:
    message = train_for(fr, endpoint)
    message.content.config_records[FEDMERGE_RECORD][BASE_ID_KEY] = "v999999"
    with pytest.raises(BulkDownloadFailed, match="names 'v999999' for download"):
        base_weights(message, context())


# ------------------------------------------------------------------- streams cut or altered


class Relay(intake_pb2_grpc.ExpertIntakeServicer):
    """Forwards GetVersion to the real endpoint and passes each chunk through ``alter``."""

    def __init__(self, upstream: str, alter: Callable[[list[intake_pb2.VersionChunk]], list[Any]]) -> None:
        self.upstream = upstream
        self.alter = alter

    def GetVersion(  # noqa: N802
        self, request: intake_pb2.GetVersionRequest, context: grpc.ServicerContext
    ) -> Iterator[intake_pb2.VersionChunk]:
        options = [("grpc.max_receive_message_length", 4 * CHUNK_BYTES)]
        with grpc.insecure_channel(self.upstream, options=options) as channel:
            chunks = list(
                intake_pb2_grpc.ExpertIntakeStub(channel).GetVersion(
                    request, metadata=context.invocation_metadata()
                )
            )
        yield from self.alter(chunks)


def relayed(
    upstream: str, alter: Callable[[list[intake_pb2.VersionChunk]], list[Any]]
) -> tuple[grpc.Server, str]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        options=[("grpc.max_send_message_length", 4 * CHUNK_BYTES)],
    )
    intake_pb2_grpc.add_ExpertIntakeServicer_to_server(Relay(upstream, alter), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def via(message: Message, address: str) -> Message:
    message.content.config_records[FEDMERGE_RECORD]["bulk-address"] = address
    return message


def cut(chunks: list[intake_pb2.VersionChunk]) -> list[intake_pb2.VersionChunk]:
    last = chunks[-1]
    return [*chunks[:-1], intake_pb2.VersionChunk(data=last.data[: len(last.data) // 2])]


def flip_last_byte(chunks: list[intake_pb2.VersionChunk]) -> list[intake_pb2.VersionChunk]:
    last = chunks[-1]
    data = bytearray(last.data)
    data[-1] ^= 0x01
    altered = intake_pb2.VersionChunk()
    altered.CopyFrom(last)
    altered.data = bytes(data)
    return [*chunks[:-1], altered]


def test_a_stream_cut_short_is_an_error(fr: FlowerRound, endpoint: BulkEndpoint) -> None:
    server, address = relayed(endpoint.address, cut)
    try:
        ctx = context()
        with pytest.raises(BulkDownloadFailed, match="cut short"):
            base_weights(via(train_for(fr, endpoint), address), ctx)
        assert BASE_META not in ctx.state.config_records  # nothing is kept
    finally:
        server.stop(None)


def test_weights_whose_digest_differs_are_not_used(fr: FlowerRound, endpoint: BulkEndpoint) -> None:
    server, address = relayed(endpoint.address, flip_last_byte)
    try:
        ctx = context()
        with pytest.raises(BulkDownloadFailed, match=r"weights digest .* corrupted in transit"):
            base_weights(via(train_for(fr, endpoint), address), ctx)
        assert BASE_META not in ctx.state.config_records
    finally:
        server.stop(None)


def test_a_wrong_announced_digest_is_an_error(fr: FlowerRound, endpoint: BulkEndpoint) -> None:
    message = train_for(fr, endpoint)
    message.content.config_records[FEDMERGE_RECORD][BASE_DIGEST_KEY] = "0" * 64
    with pytest.raises(BulkDownloadFailed, match="corrupted in transit or a wrong server"):
        base_weights(message, context())


def test_the_reference_announces_the_streamed_size(
    fr: FlowerRound, endpoint: BulkEndpoint, tmp_path: Path
) -> None:
    message = train_for(fr, endpoint)
    ref, target = ref_and_target(message)
    path = download_base(ref, target, tmp_path / "base.safetensors")
    assert path.stat().st_size == message.content.config_records[FEDMERGE_RECORD][BASE_SIZE_KEY]
    message.content.config_records[FEDMERGE_RECORD][BASE_SIZE_KEY] = ref.size + 1
    with pytest.raises(BulkDownloadFailed, match="announces"):
        base_weights(message, context())


# ----------------------------------------------------------------------------- in a round


def _download_client_app() -> ClientApp:
    """fedmerge's ClientApp; partition 1 presents a forged download token (its download is refused)."""
    from fedmerge_clients.app import train_reply

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        assert ARRAYS_RECORD not in message.content.array_records
        if int(context.node_config["partition-id"]) == 1:
            message.content.config_records[FEDMERGE_RECORD][TOKEN_KEY] = "1.0.1." + "0" * 64
        return train_reply(message, context)

    return app


@pytest.mark.integration
@pytest.mark.slow
def test_a_round_with_bulk_downlink_commits_and_a_failed_download_is_recorded(
    tmp_path: Path, simulate: Any
) -> None:
    reports = simulate(
        tmp_path / "store", _download_client_app(), 3, min_clients=3, min_valid=2, max_retries=0,
        round_deadline_s=90.0, server_eval=False, bulk_address="127.0.0.1:0", bulk_threshold_bytes=0,
        bulk_spool_dir=str(tmp_path / "spool"), bulk_spool_reserve_bytes=0, bulk_downlink=True,
    )  # fmt: skip
    (report,) = reports
    assert report.version_id is not None
    assert len(report.accepted) == 2
    (failed,) = [o for o in report.outcomes if not o.accepted]
    assert "bulk download" in str(failed.reason) and "UNAUTHENTICATED" in str(failed.reason)


@pytest.mark.integration
@pytest.mark.slow
def test_real_supernodes_fetch_the_base_through_the_bulk_channel(
    tmp_path: Path,
    insecure_deployment: InsecureDeployment,  # noqa: F811
) -> None:
    """Two new nodes, no "arrays" (threshold 0): they can only train on a base they downloaded."""
    insecure_deployment.up(nodes=2)
    store, spool = tmp_path / "store", tmp_path / "spool"
    run = insecure_deployment.flwr_run(bulk_run_config(store, spool, **{"bulk-downlink": "true"}))
    out, _ = run.communicate(timeout=400)
    assert run.returncode == 0, out[-3000:] + insecure_deployment.tail()
    assert committed_rounds(store) == [(1, [("inst-0", True, "bulk"), ("inst-1", True, "bulk")])], out[-3000:]
    assert list(spool.iterdir()) == []
    # what went down: two safetensors files of the base (through the bulk endpoint), not two "arrays"
    with ModelStore.open(store) as st:
        (version,) = [v for v in st.list() if v.round == 1]
        base = st.get(version.parents[0])
        specs = st.materialized_specs(base)
        file_size = len(encode_header(specs, {"fedmerge_version": base.id})) + sum(sp.nbytes for sp in specs)
        arrays_size = sum(len(a.data) for a in ArrayRecord(st.materialize(base)).values())
        downlink = st.get(version.id).metrics["downlink-bytes"]
    assert file_size != arrays_size
    assert downlink == 2 * file_size, (downlink, file_size, arrays_size)
