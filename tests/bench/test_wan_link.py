"""The simulated wide-area link of ``bench large``: the bucket's schedule and the proxy's relaying."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from bench.wan_link import NodeLink, TokenBucket, burst_end, burst_start


def test_back_to_back_bytes_take_their_size_over_the_rate() -> None:
    rate = 200e6
    bucket = TokenBucket(rate, burst_bytes=0)
    sizes = [65536] * 100 + [1234]
    leave = [bucket.reserve(n, now=10.0) for n in sizes]
    assert leave[-1] == pytest.approx(10.0 + 8 * sum(sizes) / rate)
    assert leave == sorted(leave)
    assert leave[0] == pytest.approx(10.0 + 8 * 65536 / rate)


def test_the_burst_allowance_is_credit_at_most_once() -> None:
    rate, burst = 8e6, 100_000  # 1 MB/s: 0.1 s of burst
    bucket = TokenBucket(rate, burst_bytes=burst)
    assert bucket.reserve(burst, now=0.0) == 0.0  # an idle link sends its burst at once
    assert bucket.reserve(500_000, now=0.0) == pytest.approx(0.5)
    # idle for a long time: credit does not accumulate beyond the burst
    assert bucket.reserve(burst, now=100.0) == 100.0
    assert bucket.reserve(burst, now=100.0) == pytest.approx(100.1)


def test_the_rate_holds_whatever_the_chunking() -> None:
    rate = 1e6
    one, many = TokenBucket(rate, 0), TokenBucket(rate, 0)
    whole = one.reserve(1_000_000, now=0.0)
    parts = [many.reserve(n, now=0.0) for n in [1] * 1000 + [999_000]]
    assert parts[-1] == pytest.approx(whole) == pytest.approx(8.0)


@pytest.mark.parametrize("rate, burst", [(0.0, 0), (-1.0, 0), (1e6, -1)])
def test_bad_bucket_settings_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match=r"link rate|burst"):
        TokenBucket(rate, burst)


def test_burst_start_skips_small_requests() -> None:
    polls = [(float(t), 300) for t in range(10)]
    upload = [(10.5 + i * 0.01, 65536) for i in range(50)]
    reads = sorted(polls + upload + [(11.0, 300)])
    assert burst_start(reads, after=0.0) == 10.5
    assert burst_start(reads, after=10.6) == pytest.approx(10.6)
    assert burst_start(polls, after=0.0) is None
    assert burst_start([], after=0.0) is None


def test_burst_end_is_the_last_large_read_until_the_reply() -> None:
    upload = [(10.0 + i * 0.01, 65536) for i in range(50)]  # 10.00 … 10.49
    paused = [(11.5, 65536), (11.6, 65536)]  # a transport that pauses between its chunks
    after = [(11.7, 300), (20.0, 65536)]  # a poll; the next round's upload
    reads = upload + paused + after
    assert burst_end(reads, 10.0, until=12.0) == 11.6
    assert burst_end(reads, 10.0, until=10.3) == pytest.approx(10.3)
    assert burst_end(reads, 12.0, until=19.0) is None


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return

            def echo(c: socket.socket = conn) -> None:
                with c:
                    while data := c.recv(1 << 16):
                        c.sendall(data)

            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, int(server.getsockname()[1])


def test_the_proxy_relays_bytes_intact_both_ways_and_counts_them() -> None:
    server, port = _echo_server()
    payload = os.urandom(3 << 20)
    with server, NodeLink(rate_bps=1e12) as link:
        via = link.forward(("127.0.0.1", port))
        for _ in range(2):  # two connections share the node's counters
            with socket.create_connection(("127.0.0.1", via)) as conn:
                received = bytearray()

                def read(c: socket.socket = conn, into: bytearray = received) -> None:
                    while data := c.recv(1 << 16):
                        into.extend(data)

                reader = threading.Thread(target=read)
                reader.start()
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                reader.join(timeout=120)
                assert not reader.is_alive()
            assert bytes(received) == payload
        assert link.bytes_up == link.bytes_down == 2 * len(payload)
        assert sum(n for _, n in link.up_reads) == 2 * len(payload)
        assert [t for t, _ in link.up_reads] == sorted(t for t, _ in link.up_reads)
