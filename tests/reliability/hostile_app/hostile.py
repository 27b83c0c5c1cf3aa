"""fedhubert's real ClientApp, except that a client misbehaves when the plan says so: the JSON file named by
$FEDHUBERT_DRILL_PLAN (the simulation's processes inherit the environment of the stage's command).

The plan maps a client (the one a message names, as fedhubert's client resolves it) to {round: behaviour}:
`raise` (the client raises), `nan` (a NaN in its update), `shape` (a parameter of the wrong shape), `missing` (a
parameter left out), `exit` (the client's process dies mid-round), `stall` (a slow client: 60 s, or
$FEDHUBERT_DRILL_STALL_S, before it trains, so that a drill can kill the server mid-round; its update is unchanged).

k-means queries are planned by step instead of round: "init", "stats:<lloyd round>", "labels", "own_codebook", with
`raise`, `exit`, `stall` or `garbage` (a NaN in the first statistic it sends). Everything else is fedhubert's own
client.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedhubert.distill.client import train_round as distill_round
from fedhubert.fl.local import identify
from fedhubert.fl.nodes import served_client
from fedhubert.labels.federated import TASK as KMEANS
from fedhubert.pretrain.client import train_round as pretrain_round

app = ClientApp()


def _planned(client: int, step: str) -> str | None:
    plan = os.environ.get("FEDHUBERT_DRILL_PLAN")
    if not plan:
        return None
    return json.loads(Path(plan).read_text()).get(str(client), {}).get(step)


def _behaviour(message: Message, context: Context) -> str | None:
    client, _ = served_client(message, context, "round")
    return _planned(client, str(int(message.content["round"]["round"])))


def _misbehave(behaviour: str | None) -> None:
    if behaviour == "raise":
        raise RuntimeError("drill: this client raises")
    if behaviour == "exit":
        os._exit(17)  # the client's process dies without a reply
    if behaviour == "stall":
        time.sleep(float(os.environ.get("FEDHUBERT_DRILL_STALL_S", "60")))


def _tamper(reply: Message, behaviour: str) -> Message:
    arrays = {name: array.numpy().copy() for name, array in reply.content["arrays"].items()}
    name = sorted(arrays)[0]
    if behaviour == "nan":
        arrays[name].reshape(-1)[0] = np.nan
    elif behaviour == "shape":
        arrays[name] = arrays[name].reshape(-1)[:-1].copy()
    elif behaviour == "missing":
        del arrays[name]
    reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return reply


def _hostile(handler):
    def train(message: Message, context: Context) -> Message:
        behaviour = _behaviour(message, context)
        _misbehave(behaviour)
        reply = handler(message, context)
        return _tamper(reply, behaviour) if behaviour in ("nan", "shape", "missing") else reply

    return train


def _hostile_kmeans(handler, step: str):
    def query(message: Message, context: Context) -> Message:
        client, _ = served_client(message, context, "run")
        behaviour = _planned(client, f"{step}:{message.metadata.group_id}" if step == "stats" else step)
        _misbehave(behaviour)
        reply = handler(message, context)
        if behaviour == "garbage":
            stats = {name: array.numpy().astype(np.float64) for name, array in reply.content["stats"].items()}
            first = sorted(stats)[0]
            stats[first].reshape(-1)[0] = np.nan
            reply.content["stats"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in stats.items()})
        return reply

    return query


app.query("identify")(identify)
app.train()(_hostile(pretrain_round))
app.train("distill")(_hostile(distill_round))
for message_type, handler in KMEANS.handlers.items():
    app.query(message_type.partition(".")[2])(_hostile_kmeans(handler, message_type.removeprefix("query.kmeans_")))
