"""The SecAgg+ app (apps/secagg) on a real Flower simulation: 3 clients, the tiny preset, 2 rounds. Its clients also
write their trained weights (`keep-client-weights`, a test aid: the simulation shares the disk), so the aggregate
the server got through SecAgg+ can be held against the plain mean of what the clients trained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from common import SECAGG_STAGES
from fedhubert.fl.config import FederationConfig
from fedhubert.fl.runtime.federation import run_flower_app
from fedhubert.model.checkpoint import load_checkpoint

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
    run_flower_app(run_config, out, 3, FederationConfig(app=APP), managed=False)  # raises unless it completed
    return json.loads((out / "secagg.json").read_text())


@pytest.mark.parametrize("secagg", [True, False], ids=["secagg", "plain"])
def test_the_aggregate_is_the_mean_of_the_clients_weights(small_partition, small_kmeans, tmp_path, secagg):
    out = tmp_path / "run"
    keys = {"num-server-rounds": 2, "local-steps": 2, "preset": "tiny", "keep-client-weights": True}
    summary = run_app(small_partition, small_kmeans, out, secagg=secagg, **keys)

    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["clients"] == 3 and r["out_of_range"] == 0 for r in summary["rounds"])
    assert all(list(r["stages"]) == (SECAGG_STAGES if secagg else ["train"]) for r in summary["rounds"])
    final = load_checkpoint(out / "final.pt")["state_dict"]
    trained = [np.load(out / "clients" / f"client_{i}" / "round_00002.npz") for i in range(3)]
    error = max(
        float(np.abs(final[k].double().numpy() - np.mean([t[k] for t in trained], axis=0)).max()) for k in final
    )
    spread = max(float(np.abs(trained[0][k] - trained[1][k]).max()) for k in final)
    if secagg:
        step = summary["quantization_step"]
        assert step == pytest.approx(2 * summary["clipping_range"] / 2**22)
        assert 0 < error <= step + 2e-7, "SecAgg+ gives the mean within its quantization step (and a float32 cast)"
        assert spread > 100 * step, "the clients differ by far more than the quantization error"
    else:
        assert error <= 1e-6 and summary["quantization_step"] is None
