"""Federated distillation as a task of fedhubert's Flower app."""

from __future__ import annotations

from fedhubert.distill.client import train_round
from fedhubert.distill.config import OUTPUTS, DistillConfig
from fedhubert.distill.run import plot_distill
from fedhubert.distill.server import serve_distill
from fedhubert.fl.tasks import ROUNDS_RUN_KEYS, FederatedTask

# `flwr run` keys (pyproject.toml's [tool.flwr.app.config]) -> config keys.
RUN_KEYS = {"teacher": "teacher", **ROUNDS_RUN_KEYS}

TASK = FederatedTask(
    "distill",
    serve_distill,
    {"train.distill": train_round},
    config_cls=DistillConfig,
    run_keys=RUN_KEYS,
    owned=OUTPUTS,
    finish=plot_distill,
)
