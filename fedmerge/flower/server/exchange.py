"""The one send-and-receive loop of the server side: push one message per node, then pull replies as
they arrive and judge each at once (the server never waits for all of them before the first is
judged), until every node answered or the deadline passed. Used by training rounds
(:mod:`fedmerge.flower.server.federation`) and federated evaluation
(:mod:`fedmerge.flower.server.evaluation`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from flwr.app import Message
from flwr.serverapp import Grid

POLL_S = 0.02  # pulling is cheap (in-memory or one RPC); a reply is judged ≤ 20 ms after it lands
PUSH_FAILED = "message could not be pushed"

Outcome = TypeVar("Outcome")


def exchange(
    grid: Grid,
    messages: list[Message],
    nodes: list[int],
    judge: Callable[[int, Message], Outcome],
    failed: Callable[[int, str], Outcome],
    deadline_s: float,
    timeout_reason: str,
) -> list[Outcome]:
    """``judge(node, reply)`` for each reply within ``deadline_s``; ``failed(node, reason)`` for a
    message that could not be pushed (:data:`PUSH_FAILED`) and for a node that did not answer in time
    (``timeout_reason``). ``messages[i]`` goes to ``nodes[i]``. Outcomes in the order they were known."""
    ids = list(grid.push_messages(messages))
    pending = {mid: node for mid, node in zip(ids, nodes, strict=True) if mid}
    outcomes = [failed(node, PUSH_FAILED) for mid, node in zip(ids, nodes, strict=True) if not mid]
    end = time.monotonic() + deadline_s
    while pending and time.monotonic() < end:
        replies = list(grid.pull_messages(list(pending)))
        for reply in replies:
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                outcomes.append(judge(node, reply))
        if not replies:
            time.sleep(POLL_S)
    outcomes.extend(failed(node, timeout_reason) for node in pending.values())
    return outcomes
