"""Federated distillation as a task of fedhubert's Flower app."""

from __future__ import annotations

from fedhubert.distill.client import train_round
from fedhubert.distill.server import serve_distill
from fedhubert.fl.tasks import FederatedTask

TASK = FederatedTask("distill", serve_distill, {"train.distill": train_round})
