"""fedhubert's real ClientApp, except that a client misbehaves when the plan says so: the JSON file named by
$FEDHUBERT_DRILL_PLAN (the simulation's processes inherit the environment of the stage's command).

The plan maps a client (the one a message names, as fedhubert's client resolves it) to {round: behaviour}:
`raise` (the client raises), `nan` (a NaN in its update), `shape` (a parameter of the wrong shape), `missing` (a
parameter left out), `exit` (the client's process dies mid-round), `stall` (a slow client: 60 s before it trains, so
that a drill can kill the server mid-round; its update is unchanged). Everything else is fedhubert's own client.
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
from fedhubert.pretrain.client import train_round as pretrain_round

app = ClientApp()


def _behaviour(message: Message, context: Context) -> str | None:
    plan = os.environ.get("FEDHUBERT_DRILL_PLAN")
    if not plan:
        return None
    client, _ = served_client(message, context, "round")
    by_client = json.loads(Path(plan).read_text()).get(str(client), {})
    return by_client.get(str(int(message.content["round"]["round"])))


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
        if behaviour == "raise":
            raise RuntimeError("drill: this client raises")
        if behaviour == "exit":
            os._exit(17)  # the client's process dies without a reply
        if behaviour == "stall":
            time.sleep(60)
        reply = handler(message, context)
        return _tamper(reply, behaviour) if behaviour in ("nan", "shape", "missing") else reply

    return train


app.query("identify")(identify)
app.train()(_hostile(pretrain_round))
app.train("distill")(_hostile(distill_round))
