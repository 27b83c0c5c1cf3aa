"""fedhubert's Flower ClientApp: the client side of every federated task.

A client is identified by its node's `partition-id` (never by anything process-specific) and reads its own
folder `client_<partition-id>` of the partition. Optional node config keys for deployments: `partition-dir`
(where this node keeps the partition) and `work-dir` (where it writes features and labels).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query("identify")
def identify(message: Message, context: Context) -> Message:
    from fedhubert.fl.local import identify as answer

    return answer(message, context)


@app.train()
def pretrain(message: Message, context: Context) -> Message:
    from fedhubert.pretrain.client import train_round

    return train_round(message, context)


@app.train("distill")
def distill(message: Message, context: Context) -> Message:
    from fedhubert.distill.client import train_round

    return train_round(message, context)


@app.query("kmeans_init")
def kmeans_init(message: Message, context: Context) -> Message:
    from fedhubert.fl.kmeans_app import client_init

    return client_init(message, context)


@app.query("kmeans_stats")
def kmeans_stats(message: Message, context: Context) -> Message:
    from fedhubert.fl.kmeans_app import client_stats

    return client_stats(message, context)


@app.query("kmeans_labels")
def kmeans_labels(message: Message, context: Context) -> Message:
    from fedhubert.fl.kmeans_app import client_labels

    return client_labels(message, context)


@app.query("kmeans_own_codebook")
def kmeans_own_codebook(message: Message, context: Context) -> Message:
    from fedhubert.fl.kmeans_app import client_own_codebook

    return client_own_codebook(message, context)
