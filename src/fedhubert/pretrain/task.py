"""Federated pretraining as a task of fedhubert's Flower app."""

from __future__ import annotations

from fedhubert.fl.tasks import ROUNDS_RUN_KEYS, FederatedTask
from fedhubert.pretrain.client import train_round
from fedhubert.pretrain.config import OUTPUTS, PretrainConfig
from fedhubert.pretrain.run import plot_pretrain
from fedhubert.pretrain.server import serve_pretrain

# `flwr run` keys (pyproject.toml's [tool.flwr.app.config]) -> config keys.
RUN_KEYS = {**ROUNDS_RUN_KEYS, "preset": "model.preset"}

TASK = FederatedTask(
    "pretrain",
    serve_pretrain,
    {"train": train_round},
    config_cls=PretrainConfig,
    run_keys=RUN_KEYS,
    owned=OUTPUTS,
    finish=plot_pretrain,
)
