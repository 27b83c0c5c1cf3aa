"""What the tests share besides fixtures: the settings that keep corpora and runs small, the CLI entry, and a
run's metrics rows."""

from __future__ import annotations

import json
from pathlib import Path

from fedhubert.cli import main

TINY_LIBRISPEECH = ["--speakers", "7", "--minutes", "0.25", "--seed", "11", "chapters=2", "max_seconds=8"]
SMALL_LIBRISPEECH = [
    "--speakers",
    "16",
    "--minutes",
    "0.15",
    "--seed",
    "3",
    "chapters=2",
    "max_seconds=5",
    "subsets.dev-other=1",
]
TINY_SPEECH_COMMANDS = [
    "--speakers",
    "10",
    "--test-speakers",
    "3",
    "--seed",
    "5",
    "noise_seconds=4",
    "auxiliary_words=[bed,cat,marvin,wow]",
]

PRETRAIN_FAST = [
    "--preset",
    "tiny",
    "--local-steps",
    "3",
    "train.device=cpu",
    "train.optim.lr=0.002",
    "train.data.min_seconds=1",
    "train.data.max_seconds=3",
    "train.data.batch_seconds=12",
]
DISTILL_FAST = [
    "--local-steps",
    "3",
    "student.layers=1",
    "train.device=cpu",
    "train.optim.lr=2e-3",
    "train.data.min_seconds=1",
    "train.data.max_seconds=3",
    "train.data.batch_seconds=12",
]

# A few S3PRL steps of batch 8: enough for a dev-best checkpoint and its test score, in well under a minute.
EVAL_SHORT = ["--steps", "4", "--eval-step", "2", "log_step=2", "batch_size=8", "num_workers=0", "device=cpu"]


SMALL_K = 20
KMEANS_FAST = ["--clusters", "16", "sample_fraction=1.0", "minibatch.n_init=2", "minibatch.max_iter=30"]
# The exchanges of one SecAgg+ round, as the SecAgg+ app's secagg.json names them.
SECAGG_STAGES = ["setup", "share_keys", "collect_masked_vectors", "unmask"]


def aggregate_error_and_spread(out: Path, summary: dict) -> tuple[float, float]:
    """A SecAgg+ app run with `keep-client-weights` (its clients write what they trained): the largest difference
    between the final model and the plain mean of the clients' last weights, and between two clients' weights."""
    import numpy as np

    from fedhubert.model.checkpoint import load_checkpoint

    final = load_checkpoint(out / "final.pt")["state_dict"]
    last = summary["rounds"][-1]["round"]
    trained = [np.load(out / "clients" / f"client_{i}" / f"round_{last:05d}.npz") for i in range(summary["clients"])]
    error = max(
        float(np.abs(final[k].double().numpy() - np.mean([t[k] for t in trained], axis=0)).max()) for k in final
    )
    spread = max(float(np.abs(trained[0][k] - trained[1][k]).max()) for k in final)
    return error, spread


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def rows(out: Path, kind: str) -> list[dict]:
    """The rows of `out/metrics.jsonl` whose kind is `kind`, in order."""
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]
