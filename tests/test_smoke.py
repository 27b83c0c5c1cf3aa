"""One end-to-end pass over the pipeline at the smallest size where every stage still does its job, for the inner
loop (`make test-quick`): a synthetic corpus, a speaker-disjoint partition, federated k-means and federated
pretraining in real Flower simulations (the session's shared runs, so the full suite pays nothing more for it), and
the export loaded by S3PRL's own `hubert_local`, whose features come out finite."""

from __future__ import annotations

import json

import pytest
import torch

from common import rows, run_cli

pytestmark = pytest.mark.smoke


def test_the_pipeline_runs_end_to_end_and_s3prl_loads_the_export(small_partition, small_kmeans, four_rounds, tmp_path):
    import s3prl.hub as hub

    partition = json.loads((small_partition / "partition.json").read_text())
    speakers = [set(c["speakers"]) for c in partition["clients"]]
    assert all(not a & b for i, a in enumerate(speakers) for b in speakers[i + 1 :]), "speaker-disjoint clients"
    assert all((small_kmeans / f"client_{i}" / "train.km").is_file() for i in range(partition["num_clients"]))
    assert [r["clients"] for r in rows(four_rounds, "train")] == [2, 2, 2, 2]
    evals = rows(four_rounds, "eval")
    assert [r["round"] for r in evals] == [0, 1, 2, 3, 4] and evals[-1]["loss"] < evals[0]["loss"]
    exported = tmp_path / "hubert_s3prl.pt"
    final = four_rounds / "checkpoints" / "final.pt"
    assert run_cli("export", "--checkpoint", final, "--format", "s3prl-hubert", "--out", exported) == 0
    upstream = hub.hubert_local(ckpt=str(exported)).eval()
    with torch.no_grad():
        hidden = upstream([torch.randn(16000), torch.randn(12000)])["hidden_states"]
    assert len(hidden) >= 2 and all(torch.isfinite(h).all() for h in hidden)
