"""Federated distillation as a task of fedhubert's Flower app."""

from __future__ import annotations

from fedhubert.distill.client import train_round
from fedhubert.distill.config import OUTPUTS, DistillConfig
from fedhubert.distill.run import plot_distill
from fedhubert.distill.server import serve_distill
from fedhubert.fl.tasks import FederatedTask

# `flwr run` keys (pyproject.toml's [tool.flwr.app.config]) -> config keys.
RUN_KEYS = {
    "teacher": "teacher",
    "partition": "partition",
    "kmeans": "kmeans",
    "num-server-rounds": "num_rounds",
    "local-steps": "local_steps",
    "fraction-train": "strategy.fraction",
    "strategy": "strategy.name",
}

TASK = FederatedTask(
    "distill",
    serve_distill,
    {"train.distill": train_round},
    config_cls=DistillConfig,
    run_keys=RUN_KEYS,
    owned=OUTPUTS,
    finish=plot_distill,
)
