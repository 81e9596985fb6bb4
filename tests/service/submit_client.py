"""A separate client process: submit one expert, print one JSON line (used by the concurrency test)."""

from __future__ import annotations

import json
import sys

from fedmerge.service.client import ClientOptions, ServiceCallError, submit_expert


def main(argv: list[str]) -> int:
    server, token, path = argv
    try:
        reply = submit_expert(ClientOptions(server, token=token), path, retries=10)
    except ServiceCallError as exc:
        print(json.dumps({"error": str(exc), "retryable": exc.retryable}))
        return 3 if exc.retryable else 1
    print(
        json.dumps(
            {"submission_id": reply.submission_id, "sha256": reply.sha256, "duplicate": reply.duplicate}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
