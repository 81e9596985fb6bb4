"""The server side of a federation in its own process, so that tests can SIGKILL it.

``python tests/flower/sim_worker.py STORE NUM_NODES JSON_OVERRIDES`` runs the fedmerge ServerApp with
``NUM_NODES`` simulated ClientApps (Flower's simulation runtime: a private SuperLink and its
``flwr-simulation`` process, both descendants of this one) on the store at ``STORE`` and prints
``round R VERSION`` after each round. Before training, each client touches
``$FEDMERGE_TEST_MARKERS/train-r{round}-p{partition}`` when that variable names a folder, so a test
can tell that a round is in flight. ``FEDMERGE_STORE_KILL_AT`` (the store's fault hook) reaches the
ServerApp's process through the environment, so that process SIGKILLs itself mid-commit.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmerge.flower.records import CONFIG_RECORD
from fedmerge.flower.server.commit import RoundReport
from fedmerge_clients.app import train_reply

MARKERS_ENV = "FEDMERGE_TEST_MARKERS"


def marking_client_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        folder = os.environ.get(MARKERS_ENV)
        if folder:
            round_ = int(message.content.config_records[CONFIG_RECORD]["round"])  # type: ignore[arg-type]
            partition = int(context.node_config["partition-id"])
            (Path(folder) / f"train-r{round_}-p{partition}").touch()
        return train_reply(message, context)

    return app


def main(argv: list[str]) -> int:
    from fedmerge.flower.simulation import ServerAppFactory, run_simulation_app

    store, num_nodes, overrides = argv[0], int(argv[1]), json.loads(argv[2])

    def on_round(report: RoundReport) -> None:
        print(f"round {report.round} {report.version_id}", flush=True)

    run_simulation_app(
        ServerAppFactory("fedmerge_server.app:make_server_app"),
        marking_client_app(),
        num_supernodes=num_nodes,
        run_config={"store": store, **overrides},
        on_report=on_round,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
