"""fedhubert's Flower app, the composition root of the federated stages: a ServerApp and a ClientApp carrying
every stage's task. pyproject.toml's [tool.flwr.app.components], and the app folder each run gets
(`fedhubert.fl.runtime.federation`), name `serverapp` and `clientapp` here.

The node config keys the ClientApp reads: `partition-id` (which client a node is; required), and on deployments,
optionally, `partition-dir` (where the node keeps the partition), `work-dir` (where it writes features, labels
and local heads), `kmeans-dir` (its k-means labels, for pretraining and distillation with the k-means term) and
`teacher-checkpoint` (the teacher, for distillation)."""

from __future__ import annotations

from fedhubert.distill.task import TASK as DISTILL
from fedhubert.fl.tasks import client_app, server_app
from fedhubert.labels.federated import TASK as KMEANS
from fedhubert.pretrain.task import TASK as PRETRAIN

TASKS = (KMEANS, PRETRAIN, DISTILL)
serverapp = server_app(TASKS)
clientapp = client_app(TASKS)
