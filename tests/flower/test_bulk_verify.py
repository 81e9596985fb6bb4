"""Bulk uploads verified as they arrive: the endpoint's own sha256 of the received bytes is trusted
(the spooled file is not read again while it is the file published), and the judge's per-tensor
checks run when an upload completes, before its reply. Real gRPC endpoint on localhost, real spool,
real ``RoundState.judge``; every refusal of the judge still happens, with the same reason."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedmerge.flower.client.bulk import upload_package
from fedmerge.flower.server.bulk_endpoint import BulkEndpoint
from fedmerge.flower.server.judge import RoundState
from fedmerge.flower.server.spool_merge import (
    CHECK_WORKERS,
    PARALLEL_MIN_BYTES,
    SpooledDelta,
    check_workers,
    decode_workers,
    tensor_map,
)
from fedmerge_testing.hostile import Attack, FlowerRound
from fedmerge_testing.hostile.mutations import mutate

sys.path.insert(0, str(Path(__file__).parent))

from test_large_rounds import (
    ATTEMPT,
    ROUND,
    bulk_reply,
    spool_object,
    target,
)


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


def bytes_read() -> int:
    """Bytes this process has read with read(2) and its kin so far (``rchar`` of /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def mapped(path: Path) -> bool:
    """Whether this process maps ``path`` (as /proc/self/maps lists it, deleted or not)."""
    return str(path) in Path("/proc/self/maps").read_text()


def wait_until(done: Callable[[], bool], what: str) -> None:
    """Poll ``done`` while the process keeps using CPU (its work progresses); fail once it stalls:
    no CPU time used for 10 s and still not done."""
    last_cpu, last_change = time.process_time(), time.monotonic()
    while not done():
        time.sleep(0.02)
        cpu = time.process_time()
        if cpu != last_cpu:
            last_cpu, last_change = cpu, time.monotonic()
        elif time.monotonic() - last_change > 10.0:
            raise AssertionError(f"stalled waiting for {what}")


def spooled_state(fr: FlowerRound, ep: BulkEndpoint) -> RoundState:
    state = RoundState(fr.cfg, ROUND, fr.base, fr.weights, fold=False)
    state.bulk, state.attempt = ep, ATTEMPT
    return state


def test_resolve_trusts_the_hash_computed_on_arrival_and_rereads_after_a_restart(
    fr: FlowerRound, endpoint: BulkEndpoint, tmp_path: Path
) -> None:
    payload = os.urandom(24 << 20)
    sha = upload_package(payload, target(endpoint, 3))
    before = bytes_read()
    path = endpoint.resolve(sha, len(payload), ROUND, ATTEMPT, 3)
    assert bytes_read() - before < len(payload) // 4  # not read again
    assert path.read_bytes() == payload
    endpoint.stop()  # a restarted server knows nothing of the upload: it hashes the file again
    again = BulkEndpoint(endpoint.spool, "127.0.0.1:0", max_bytes=64 << 20, reserve_bytes=0, threshold=0)
    again.open_round(ROUND, ATTEMPT)
    before = bytes_read()
    assert again.resolve(sha, len(payload), ROUND, ATTEMPT, 3) == path
    assert bytes_read() - before >= len(payload)


def test_a_file_changed_after_its_upload_is_hashed_again_and_refused(
    fr: FlowerRound, endpoint: BulkEndpoint
) -> None:
    data = fr.valid(0).data
    state = spooled_state(fr, endpoint)
    state.verify_uploads_as_they_arrive()
    sha = upload_package(data, target(endpoint, 3))
    path = spool_object(endpoint, sha)
    wait_until(lambda: mapped(path), "the verification on arrival")
    time.sleep(0.05)  # the kernel stamps file times from a clock that ticks every few ms
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    out = state.judge(3, bulk_reply(3, sha, len(data)))
    assert not out.accepted and "hashes to" in str(out.reason), out.reason
    endpoint.close_round(ROUND, ATTEMPT)
    wait_until(lambda: not mapped(path), "the unclaimed verification to be closed")


def test_an_upload_is_verified_when_it_completes_and_its_reply_takes_that_result(
    fr: FlowerRound, endpoint: BulkEndpoint
) -> None:
    inline = fr.state()
    state = spooled_state(fr, endpoint)
    state.verify_uploads_as_they_arrive()
    for node in (1, 2):
        data = fr.valid(node).data
        sha = upload_package(data, target(endpoint, node))
        path = spool_object(endpoint, sha)
        wait_until(lambda p=path: mapped(p), "the verification on arrival")  # type: ignore[misc]
        a = inline.judge(node, fr.reply(Attack(data), node_id=node))
        b = state.judge(node, bulk_reply(node, sha, len(data)))
        assert a.accepted and b.accepted, (a.reason, b.reason)
        assert b.submission_hash == a.submission_hash
        assert state.scores[b.client_id]["norm"] == pytest.approx(
            inline.scores[a.client_id]["norm"], rel=1e-12
        )
        assert endpoint.take_verified(sha, ROUND, ATTEMPT, node) is None  # taken once, by its reply
    assert [type(h.delta) for h in state.held] == [SpooledDelta, SpooledDelta]
    for held in state.held:
        held.close()


def test_direct_verification_result_is_the_judges_check(fr: FlowerRound, endpoint: BulkEndpoint) -> None:
    state = spooled_state(fr, endpoint)
    state.verify_uploads_as_they_arrive()
    data = fr.valid(0).data
    sha = upload_package(data, target(endpoint, 3))
    pending = endpoint.take_verified(sha, ROUND, ATTEMPT, 3)
    assert pending is not None
    spooled = pending.result()
    try:
        assert isinstance(spooled, SpooledDelta)
        assert spooled.meta.num_examples >= 1 and spooled.norm > 0
    finally:
        spooled.close()
    assert endpoint.take_verified(sha, ROUND, ATTEMPT, 4) is None  # another node's: nothing


def _inf_scale(pkg: object) -> None:
    td = next(t for t in pkg.tensors if t.block_scales)  # type: ignore[attr-defined]
    td.block_scales = b"\x00\x00\x80\x7f" + td.block_scales[4:]  # +inf as fp32


def _flip_value(pkg: object) -> None:
    td = next(t for t in pkg.tensors if t.values)  # type: ignore[attr-defined]
    td.values = bytes([td.values[0] ^ 0xFF]) + td.values[1:]


@pytest.mark.parametrize(
    ("edit", "sign", "reason"),
    [(_inf_scale, True, "NonFiniteValues"), (_flip_value, False, "ChecksumMismatch")],
)
def test_a_bad_package_verified_on_arrival_is_refused_with_the_judges_reason(
    fr: FlowerRound, endpoint: BulkEndpoint, edit: Callable[[object], None], sign: bool, reason: str
) -> None:
    data = mutate(fr.valid(0).data, edit, sign=sign)
    sha = upload_package(data, target(endpoint, 3))
    late = spooled_state(fr, endpoint)  # verified when its reply is judged
    expected = late.judge(3, bulk_reply(3, sha, len(data)))
    assert not expected.accepted and reason in str(expected.reason), expected.reason
    endpoint.close_round(ROUND, ATTEMPT)
    endpoint.open_round(ROUND, ATTEMPT)
    early = spooled_state(fr, endpoint)
    early.verify_uploads_as_they_arrive()
    assert upload_package(data, target(endpoint, 3)) == sha
    pending = endpoint.take_verified(sha, ROUND, ATTEMPT, 3)
    assert pending is not None and pending.exception() is not None  # refused on arrival...
    assert reason in type(pending.exception()).__name__
    endpoint.close_round(ROUND, ATTEMPT)
    endpoint.open_round(ROUND, ATTEMPT)
    early = spooled_state(fr, endpoint)
    early.verify_uploads_as_they_arrive()
    upload_package(data, target(endpoint, 3))
    out = early.judge(3, bulk_reply(3, sha, len(data)))  # ...and its reply with the same reason
    assert (out.accepted, out.reason) == (expected.accepted, expected.reason)


def test_only_a_nodes_first_upload_is_verified_on_arrival(fr: FlowerRound, endpoint: BulkEndpoint) -> None:
    state = spooled_state(fr, endpoint)
    state.verify_uploads_as_they_arrive()
    first, second = fr.valid(0).data, fr.valid(1).data
    sha1 = upload_package(first, target(endpoint, 3))
    sha2 = upload_package(second, target(endpoint, 3))
    assert endpoint.take_verified(sha2, ROUND, ATTEMPT, 3) is None
    out = state.judge(3, bulk_reply(3, sha2, len(second)))  # judged when it is referenced
    assert out.accepted, out.reason
    path1 = spool_object(endpoint, sha1)
    endpoint.close_round(ROUND, ATTEMPT)  # the first one's verification, claimed by no reply, is closed
    wait_until(lambda: not mapped(path1), "the unclaimed verification to be closed")
    for held in state.held:
        held.close()


def test_tensor_map_keeps_the_order_and_raises_the_first_failure_in_that_order() -> None:
    def slow_square(i: int) -> int:
        time.sleep(0.001 * (10 - i))  # later items finish first
        if i in (3, 7):
            raise ValueError(f"item {i}")
        return i * i

    assert list(tensor_map(lambda i: i * i, range(10))) == [i * i for i in range(10)]
    with pytest.raises(ValueError, match="item 3"):
        list(tensor_map(slow_square, range(10)))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_tensor_map_keeps_at_most_workers_calls_in_flight(workers: int) -> None:
    lock = threading.Lock()
    running, peak = 0, 0

    def tracked(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.002)
        with lock:
            running -= 1
        return i

    assert list(tensor_map(tracked, range(12), workers)) == list(range(12))
    assert peak <= workers


def test_check_workers_keeps_the_decoded_tensors_in_flight_within_the_budget() -> None:
    mib = 1 << 20
    assert check_workers([(256, 1024)], budget=16 * mib) == min(CHECK_WORKERS, 16)  # 1 MiB tensors
    assert check_workers([(4, 4), (3_900_000,)], budget=16 * mib) == 1  # a 15.6 MB tensor: one at a time
    assert check_workers([(4 * mib,)], budget=64 * mib) == min(CHECK_WORKERS, 4)
    assert check_workers([], budget=16 * mib) == CHECK_WORKERS


def test_small_inline_packages_are_decoded_in_the_judging_thread() -> None:
    assert decode_workers(0) == decode_workers(PARALLEL_MIN_BYTES - 1) == 1
    assert decode_workers(PARALLEL_MIN_BYTES) == CHECK_WORKERS
