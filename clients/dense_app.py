"""A plain Flower ClientApp, written as Flower's quickstarts write one: it replies with its full
weights as an ``ArrayRecord`` (``"arrays"``) and ``num-examples`` in a ``MetricRecord``
(``"metrics"``). It knows nothing of fedmerge's codec; the fedmerge server turns its reply into a
task vector τ = θ_reply − θ_base and merges it like any other. The base weights come in the message
(``fedmerge.base``) or from this node's ``context.state`` cache.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmerge.flower.client import TrainInstructions, resolve_base
from fedmerge.flower.rounds import CONFIG_RECORD
from fedmerge_clients.app import node_partition, partition_for
from fedmerge_simulations.local_round import client_generator
from fedmerge_simulations.tasks import get_task

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    conf = TrainInstructions.from_record(message.content.config_records[CONFIG_RECORD])
    base = resolve_base(message.content, context, conf.base_version_id, conf.base_version_hash)
    pid, num = node_partition(context)
    task = get_task(conf.task)
    data = partition_for(conf.task, num, conf.partitioner, conf.dirichlet_alpha, conf.seed)[pid]
    model = task.build_model(conf.seed)
    model.load_state_dict(base)
    metrics = task.train(
        model, data, epochs=conf.local_epochs, lr=conf.lr, batch_size=conf.batch_size,
        generator=client_generator(conf.seed, conf.round, pid),
    )  # fmt: skip
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({**metrics, "num-examples": data.num_examples}),
        }
    )
    return Message(content, reply_to=message)
