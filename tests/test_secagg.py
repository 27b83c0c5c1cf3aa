"""The SecAgg+ app (apps/secagg) on a real Flower simulation: 3 clients, the tiny preset, 2 rounds. Its clients also
write their trained weights (`keep-client-weights`, a test aid: the simulation shares the disk), so the aggregate
the server got through SecAgg+ can be held against the plain mean of what the clients trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from common import aggregate_error_and_spread
from fedhubert.fl.config import FederationConfig
from fedhubert.fl.runtime.federation import run_flower_app

pytestmark = pytest.mark.slow
APP = Path(__file__).resolve().parents[1] / "apps" / "secagg"
FAST = {
    "train": {
        "device": "cpu",
        "optim": {"lr": 0.002},
        "data": {"min_seconds": 1, "max_seconds": 3, "batch_seconds": 12},
    }
}


def run_app(partition: Path, kmeans: Path, out: Path, **keys: object) -> dict:
    config = out.parent / "fast.yaml"
    config.write_text(yaml.safe_dump(FAST))
    run_config = {"config": str(config), "partition": str(partition), "kmeans": str(kmeans), "out": str(out), **keys}
    # The app samples clients by SuperNode (it knows no virtual clients), so each of the 3 gets its own: on one core
    # fedhubert's default pool is 2 SuperNodes, and the app's strategy waited for a third until pytest's timeout.
    federation = FederationConfig(app=APP, virtual_clients=False)
    run_flower_app(run_config, out, 3, federation, managed=False)  # raises unless it completed
    return json.loads((out / "secagg.json").read_text())


def test_without_secagg_the_aggregate_is_the_mean_of_the_clients_weights(small_partition, small_kmeans, tmp_path):
    """The app with secagg=false: one plain train exchange a round, and the aggregate is the clients' mean to float
    precision. (With SecAgg+, within its quantization step: tests/test_flwr_run.py, which runs the app as README
    does.)"""
    out = tmp_path / "run"
    keys = {"num-server-rounds": 2, "local-steps": 2, "preset": "tiny", "keep-client-weights": True}
    summary = run_app(small_partition, small_kmeans, out, secagg=False, **keys)

    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["clients"] == 3 and r["out_of_range"] == 0 for r in summary["rounds"])
    assert all(list(r["stages"]) == ["train"] for r in summary["rounds"])
    error, _ = aggregate_error_and_spread(out, summary)
    assert error <= 1e-6 and summary["quantization_step"] is None
