"""Large payloads in rounds: packages uploaded through the ServerApp's bulk endpoint and judged from
the round's spool. Real gRPC endpoint on localhost, real BulkStore spool, real ``RoundState.judge``;
every bad reference is a recorded rejection with its reason, and the spool is reclaimed."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmerge.flower.client.bulk import (
    REF_SHA_KEY,
    REF_SIZE_KEY,
    BulkTarget,
    BulkUploadFailed,
    upload_package,
)
from fedmerge.flower.records import CONFIG_RECORD, METRICS_RECORD
from fedmerge.flower.server.bulk_endpoint import BulkEndpoint, make_token
from fedmerge.flower.server.judge import RoundState
from fedmerge.flower.server.spool_merge import merge_tensor_major
from fedmerge.store import ModelStore
from fedmerge.v1 import intake_pb2, intake_pb2_grpc
from fedmerge_testing.hostile import Attack, FlowerRound, train_message

sys.path.insert(0, str(Path(__file__).parent))

from test_deployment import (
    BIN,
    ROOT,
    Deployment,
    deployment,  # noqa: F401  (fixture)
    free_port,
    wait_for_port,
)

ROUND, ATTEMPT = 1, 0


@pytest.fixture
def fr(tmp_path: Path) -> FlowerRound:
    return FlowerRound.open(tmp_path / "store")


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[BulkEndpoint]:
    ep = BulkEndpoint(tmp_path / "spool", "127.0.0.1:0", max_bytes=64 << 20, reserve_bytes=0, threshold=0)
    ep.start()
    ep.open_round(ROUND, ATTEMPT)
    yield ep
    ep.stop()


def target(ep: BulkEndpoint, node: int, round_: int = ROUND, attempt: int = ATTEMPT) -> BulkTarget:
    return BulkTarget(ep.address, make_token(ep.secret, round_, attempt, node), 0)


def bulk_reply(node: int, sha: str, size: int) -> Message:
    content = RecordDict(
        {
            CONFIG_RECORD: ConfigRecord({REF_SHA_KEY: sha, REF_SIZE_KEY: size}),
            METRICS_RECORD: MetricRecord({"num-examples": 10}),
        }
    )
    return Message(content, reply_to=train_message(node))


def spool_object(ep: BulkEndpoint, sha: str) -> Path:
    return ep.router.open(ROUND, ATTEMPT).path(sha)


def judge_bulk(fr: FlowerRound, ep: BulkEndpoint, node: int, reply: Message) -> object:
    """The reply judged by the in-memory fold and by the tensor-major path: both must agree."""
    outcomes = []
    for fold in (True, False):
        state = RoundState(fr.cfg, ROUND, fr.base, fr.weights, fold=fold)
        state.bulk, state.attempt = ep, ATTEMPT
        outcomes.append(state.judge(node, reply))
        for held in state.held:
            held.close()
    folded, spooled = outcomes
    assert (folded.accepted, folded.reason) == (spooled.accepted, spooled.reason)
    return spooled


@pytest.mark.parametrize("aggregator", ["ties", "dare_ties", "median", "fedavg"])
def test_tensor_major_merge_of_spooled_replies_is_the_in_memory_merge(
    tmp_path: Path, endpoint: BulkEndpoint, aggregator: str
) -> None:
    fr = FlowerRound.open(tmp_path / "store", aggregator=aggregator)
    inline = RoundState(fr.cfg, ROUND, fr.base, fr.weights)
    spooled = RoundState(fr.cfg, ROUND, fr.base, fr.weights, fold=False)
    spooled.bulk, spooled.attempt = endpoint, ATTEMPT
    for node in (1, 2, 3):
        data = fr.valid(node).data
        sha = upload_package(data, target(endpoint, node))
        a = inline.judge(node, fr.reply(Attack(data), node_id=node))
        b = spooled.judge(node, bulk_reply(node, sha, len(data)))
        assert a.accepted and b.accepted, (a.reason, b.reason)
        assert inline.scores[a.client_id]["norm"] == pytest.approx(
            spooled.scores[b.client_id]["norm"], rel=1e-12
        )
    assert spooled.aggregator.num_clients == 0 and len(spooled.held) == 3  # nothing folded while judging
    try:
        merged = dict(merge_tensor_major(fr.cfg, ROUND, spooled.shapes, spooled.held))
    finally:
        for held in spooled.held:
            held.close()
    expected = inline.aggregator.finalize()
    assert list(merged) == sorted(expected)
    assert all(torch.equal(merged[k], expected[k]) for k in expected), aggregator


def test_bulk_reply_is_accepted_and_merges_as_the_inline_reply(
    fr: FlowerRound, endpoint: BulkEndpoint
) -> None:
    data = fr.valid(0).data
    sha = upload_package(data, target(endpoint, 3))
    assert sha == hashlib.sha256(data).hexdigest()
    inline = fr.state()
    ok_inline = inline.judge(3, fr.reply(Attack(data), node_id=3))
    bulk = fr.state()
    bulk.bulk, bulk.attempt = endpoint, ATTEMPT
    ok_bulk = bulk.judge(3, bulk_reply(3, sha, len(data)))
    assert ok_inline.accepted and ok_bulk.accepted, (ok_inline.reason, ok_bulk.reason)
    assert ok_bulk.submission_hash == ok_inline.submission_hash
    assert ok_bulk.wire_bytes == len(data)
    assert ok_bulk.codec is not None and ok_bulk.codec["transport"] == "bulk"
    a, b = inline.aggregator.finalize(), bulk.aggregator.finalize()
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_reference_to_a_missing_object_is_rejected(fr: FlowerRound, endpoint: BulkEndpoint) -> None:
    out = judge_bulk(fr, endpoint, 3, bulk_reply(3, "ab" * 32, 100))
    assert not out.accepted and "does not exist" in str(out.reason)  # type: ignore[attr-defined]


def test_reference_to_another_nodes_object_is_rejected(fr: FlowerRound, endpoint: BulkEndpoint) -> None:
    data = fr.valid(0).data
    sha = upload_package(data, target(endpoint, 3))
    out = judge_bulk(fr, endpoint, 4, bulk_reply(4, sha, len(data)))
    assert not out.accepted and "uploaded by another node" in str(out.reason)  # type: ignore[attr-defined]


def test_reference_to_an_upload_in_progress_is_rejected(fr: FlowerRound, endpoint: BulkEndpoint) -> None:
    data = fr.valid(0).data
    sha = hashlib.sha256(data).hexdigest()
    metadata = (("authorization", f"Bearer {target(endpoint, 3).token}"),)
    with grpc.insecure_channel(endpoint.address) as channel:
        stub = intake_pb2_grpc.BulkUploadStub(channel)
        stub.Begin(intake_pb2.BulkBeginRequest(sha256=sha, total_size=len(data)), metadata=metadata)
        half = len(data) // 2
        chunk = intake_pb2.BulkChunk(sha256=sha, offset=0, data=data[:half])
        status = stub.Upload(iter([chunk]), metadata=metadata)
    assert not status.complete
    out = judge_bulk(fr, endpoint, 3, bulk_reply(3, sha, len(data)))
    assert not out.accepted and f"still uploading ({half} of {len(data)}" in str(out.reason)  # type: ignore[attr-defined]


def test_truncated_spooled_object_is_rejected(fr: FlowerRound, endpoint: BulkEndpoint) -> None:
    data = fr.valid(0).data
    sha = upload_package(data, target(endpoint, 3))
    path = spool_object(endpoint, sha)
    path.write_bytes(data[:-10])
    out = judge_bulk(fr, endpoint, 3, bulk_reply(3, sha, len(data)))
    assert not out.accepted and "truncated" in str(out.reason)  # type: ignore[attr-defined]


def test_spooled_object_whose_hash_does_not_match_is_rejected(
    fr: FlowerRound, endpoint: BulkEndpoint
) -> None:
    data = fr.valid(0).data
    sha = upload_package(data, target(endpoint, 3))
    path = spool_object(endpoint, sha)
    time.sleep(0.05)  # a rewrite is seen by the file's times, stamped from a clock that ticks every few ms
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    out = judge_bulk(fr, endpoint, 3, bulk_reply(3, sha, len(data)))
    assert not out.accepted and "hashes to" in str(out.reason)  # type: ignore[attr-defined]


def test_declared_size_that_differs_is_rejected(fr: FlowerRound, endpoint: BulkEndpoint) -> None:
    data = fr.valid(0).data
    sha = upload_package(data, target(endpoint, 3))
    out = judge_bulk(fr, endpoint, 3, bulk_reply(3, sha, len(data) + 1))
    assert not out.accepted and "declares" in str(out.reason)  # type: ignore[attr-defined]


def test_forged_or_closed_round_tokens_cannot_upload(fr: FlowerRound, endpoint: BulkEndpoint) -> None:
    data = fr.valid(0).data
    forged = BulkTarget(endpoint.address, make_token(b"x" * 32, ROUND, ATTEMPT, 3), 0)
    with pytest.raises(BulkUploadFailed, match="UNAUTHENTICATED"):
        upload_package(data, forged, retries=0)
    with pytest.raises(BulkUploadFailed, match="closed"):
        upload_package(data, target(endpoint, 3, round_=ROUND + 1), retries=0)


def test_full_spool_disk_refuses_the_upload_and_keeps_nothing(fr: FlowerRound, tmp_path: Path) -> None:
    ep = BulkEndpoint(
        tmp_path / "spool", "127.0.0.1:0", max_bytes=64 << 20, reserve_bytes=1 << 62, threshold=0
    )
    ep.start()
    try:
        ep.open_round(ROUND, ATTEMPT)
        with pytest.raises(BulkUploadFailed, match="spool disk full"):
            upload_package(fr.valid(0).data, target(ep, 3), retries=0)
        files = [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]
        assert files == []
    finally:
        ep.stop()


def test_closing_the_round_reclaims_its_spool(fr: FlowerRound, endpoint: BulkEndpoint) -> None:
    sha = upload_package(fr.valid(0).data, target(endpoint, 3))
    assert spool_object(endpoint, sha).is_file()
    endpoint.close_round(ROUND, ATTEMPT)
    assert list(endpoint.spool.iterdir()) == []


# ------------------------------------------------------------------ real SuperLink and SuperNodes


@dataclass
class InsecureDeployment(Deployment):
    """A localhost SuperLink and SuperNodes without TLS (the bulk channel is what is under test); every
    process is ended by its pid (and its descendants) at the end, pass or fail."""

    port: int = 0

    def up(self, nodes: int) -> None:
        self.port = free_port()
        link = self.start(
            "superlink",
            [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
             "--database", str(self.logs / "superlink.db"), "--disable-runtime-dependency-installation"],
        )  # fmt: skip
        wait_for_port(self.port, link, 60)
        home = Path(self.env["FLWR_HOME"])
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        for i in range(nodes):
            self.start(
                f"supernode{i}",
                [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--insecure",
                 "--port", str(free_port()),
                 "--node-config", f'partition-id={i} num-partitions={nodes} client-id="inst-{i}"'],
            )  # fmt: skip

    def flwr_run(self, run_config: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(BIN / "flwr"), "run", ".", "--stream", "--run-config", run_config],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def serverapps(self) -> list[psutil.Process]:
        """The ServerApp processes the SuperLink started (``flwr-serverapp``)."""
        out = []
        for proc in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if any("flwr-serverapp" in part for part in child.cmdline()):
                            out.append(child)
        return out


@pytest.fixture
def insecure_deployment(deployment: Deployment) -> Iterator[InsecureDeployment]:  # noqa: F811
    dep = InsecureDeployment(
        {**deployment.env, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}, deployment.logs
    )
    yield dep
    dep.stop()


def bulk_run_config(store: Path, spool: Path, **extra: object) -> str:
    keys = {
        "store": f"'{store}'", "num-rounds": 1, "min-clients": 2, "min-valid": 2, "local-epochs": 1,
        "bulk-address": "'127.0.0.1:0'", "bulk-threshold-bytes": 0, "bulk-spool-dir": f"'{spool}'",
        "bulk-spool-reserve-bytes": 0, **extra,
    }  # fmt: skip
    return " ".join(f"{k}={v}" for k, v in keys.items())


def merge_orders(store: Path) -> list[str]:
    """Each committed round's ``merge-order`` (tensor-major from the spool, or in memory)."""
    with ModelStore.open(store) as st:
        return [str(st.get(v.id).params.get("merge-order")) for v in st.list() if v.round is not None]


def committed_rounds(store: Path) -> list[tuple[int, list[tuple[str, bool, str | None]]]]:
    with ModelStore.open(store) as st:
        out = []
        for v in sorted((v for v in st.list() if v.round is not None), key=lambda v: v.round or 0):
            full = st.get(v.id)
            people = sorted(
                (c.client_id, c.accepted, (c.codec or {}).get("transport")) for c in full.contributors
            )
            out.append((int(v.round or 0), people))
        assert st.verify().ok
        return out


@pytest.mark.integration
@pytest.mark.slow
def test_round_with_real_supernodes_moves_deltas_through_the_bulk_channel(
    tmp_path: Path, insecure_deployment: InsecureDeployment
) -> None:
    insecure_deployment.up(nodes=2)
    store, spool = tmp_path / "store", tmp_path / "spool"
    run = insecure_deployment.flwr_run(bulk_run_config(store, spool))
    out, _ = run.communicate(timeout=400)
    assert run.returncode == 0, out[-3000:] + insecure_deployment.tail()
    rounds = committed_rounds(store)
    assert rounds == [(1, [("inst-0", True, "bulk"), ("inst-1", True, "bulk")])], out[-3000:]
    assert list(spool.iterdir()) == []  # reclaimed after the commit
    assert merge_orders(store) == ["in-memory"]  # server-side evaluation needs the merged delta whole


@pytest.mark.integration
@pytest.mark.slow
def test_server_killed_mid_round_resumes_the_spool_and_commits_once(
    tmp_path: Path, insecure_deployment: InsecureDeployment
) -> None:
    """Partition 0 replies at once, partition 1 straggles (seed 5 draws exactly that): the ServerApp
    is SIGKILLed once partition 0's package is spooled, before the round can commit. A new run keeps
    round 1's spool (its objects are verified again before use), commits round 1 once with both
    deltas from the bulk channel, and reclaims the spool."""
    insecure_deployment.up(nodes=2)
    store, spool = tmp_path / "store", tmp_path / "spool"
    config = bulk_run_config(
        store, spool, seed=5,
        **{"fault-straggler": 0.5, "fault-straggler-delay-s": 20.0, "server-eval": "false"},
    )  # fmt: skip
    first = insecure_deployment.flwr_run(config)
    objects = spool / "round-1-attempt-0" / "objects"
    end = time.monotonic() + 300
    while not (objects.is_dir() and any(objects.iterdir())):
        assert first.poll() is None, str(first.communicate()[0])[-3000:] + insecure_deployment.tail()
        assert time.monotonic() < end, "no package was spooled\n" + insecure_deployment.tail()
        time.sleep(0.1)
    servers = insecure_deployment.serverapps()
    assert servers, "no flwr-serverapp process found\n" + insecure_deployment.tail()
    for proc in servers:
        proc.kill()  # SIGKILL
    first.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        first.communicate(timeout=30)
    spooled = [p.name for p in objects.iterdir()]
    assert committed_rounds(store) == []  # nothing of round 1 was committed
    second = insecure_deployment.flwr_run(config)
    out, _ = second.communicate(timeout=500)
    assert second.returncode == 0, out[-3000:] + insecure_deployment.tail()
    rounds = committed_rounds(store)
    assert rounds == [(1, [("inst-0", True, "bulk"), ("inst-1", True, "bulk")])], out[-3000:]
    with ModelStore.open(store) as st:
        version = next(v for v in st.list() if v.round == 1)
        hashes = {c.client_id: c.submission_hash for c in st.get(version.id).contributors}
    # the spooled package of the killed run is the one the new run judged (training is seeded)
    assert hashes["inst-0"] in spooled, (hashes, spooled)
    assert list(spool.iterdir()) == []
    assert merge_orders(store) == ["tensor-major"]


def test_with_a_bulk_endpoint_each_delta_is_folded_at_once(tmp_path: Path) -> None:
    """Server memory must not grow with the number of clients: no group of decoded deltas is kept."""
    bulk = FlowerRound.open(tmp_path / "a", **{"bulk-address": "127.0.0.1:0"}).state().aggregator
    inline = FlowerRound.open(tmp_path / "b").state().aggregator
    assert bulk.group_size == 1 and inline.group_size > 1


def _bad_bulk_client_app() -> ClientApp:
    """Partitions 0 and 1 reply correctly through the bulk channel; 2 uploads and then references an
    object that does not exist; 3 uploads and never replies (it answers after its message's deadline).
    A reference to another node's object is covered with the real endpoint above."""
    from fedmerge_clients.app import train_reply

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        reply = train_reply(message, context)
        if partition == 2:
            reply.content.config_records[CONFIG_RECORD][REF_SHA_KEY] = "0" * 64
        elif partition == 3:
            late = message.metadata.created_at + message.metadata.ttl + 2.0
            while (left := late - time.time()) > 0:
                time.sleep(min(left, 0.5))
        return reply

    return app


@pytest.mark.integration
@pytest.mark.slow
def test_bad_bulk_references_are_recorded_and_the_round_goes_on(tmp_path: Path, simulate: Any) -> None:
    spool = tmp_path / "spool"
    reports = simulate(
        tmp_path / "store", _bad_bulk_client_app(), 4, min_clients=4, min_valid=2, max_retries=0,
        round_deadline_s=90.0, server_eval=False, bulk_address="127.0.0.1:0", bulk_threshold_bytes=0,
        bulk_spool_dir=str(spool), bulk_spool_reserve_bytes=0,
    )  # fmt: skip
    (report,) = reports
    assert report.version_id is not None
    with ModelStore.open(tmp_path / "store") as st:
        version = st.get(report.version_id)
        contributors = {c.client_id: c for c in version.contributors}
        assert st.verify().ok
    accepted = [c for c in contributors.values() if c.accepted]
    reasons = {k: str(c.reason) for k, c in contributors.items() if not c.accepted}
    assert len(accepted) == 2 and all((c.codec or {}).get("transport") == "bulk" for c in accepted)
    assert sum("does not exist" in r for r in reasons.values()) == 1, reasons
    # the silent node: the round's deadline, or Flower's own expiry of its message (simulation)
    late = [r for r in reasons.values() if r.startswith("timeout") or "Message Unavailable" in r]
    assert len(late) == 1, reasons
    assert list(spool.iterdir()) == []  # the silent node's upload went with the round's spool
    assert version.params["merge-order"] == "tensor-major"
