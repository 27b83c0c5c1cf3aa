"""Federated pretraining as a task of fedhubert's Flower app."""

from __future__ import annotations

from fedhubert.fl.tasks import FederatedTask
from fedhubert.pretrain.client import train_round
from fedhubert.pretrain.server import serve_pretrain

TASK = FederatedTask("pretrain", serve_pretrain, {"train": train_round})
