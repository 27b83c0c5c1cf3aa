"""Federated overhead and bytes on the wire of `fedhubert pretrain`, in one run.

Overhead: the wall time of an N-round simulation against the sum of the clients' local training time in the same
run (each client measures its own). Clients get all the machine's cores, so they train one after another and the
sum is the compute a single machine would spend anyway; the rest (model building, messages, aggregation,
evaluation) is the federated overhead of the rounds. Starting Flower (SuperLink, Ray, the ServerApp process) costs
a fixed ~20 s per run on top, reported separately along with the end-to-end ratio. Bytes: what each client receives and
sends per round (messages.jsonl) against the model's float32 size, with float32 and with bfloat16 transfer.

Targets (issue 6): overhead under 15% for the small preset on CPU; bytes at most 1.0x (0.5x with bfloat16).
The corpus, partition and k-means labels are made once under build/bench/federated/.

    python benchmarks/federated.py [--rounds 3] [--local-steps 20] [--preset small]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from _common import run_cli, write_results
from fedhubert.fl.records import read_messages
from fedhubert.parallel import available_cpus

ROOT = Path(__file__).resolve().parents[1] / "build" / "bench" / "federated"
TRAIN = [
    "train.device=cpu",
    "train.data.min_seconds=2",
    "train.data.max_seconds=4",
    "train.data.batch_seconds=16",
    "train.optim.warmup_steps=10",
    "train.optim.total_steps=10000",
]


def inputs() -> tuple[Path, Path]:
    corpus, partition, kmeans = ROOT / "corpus", ROOT / "partition", ROOT / "kmeans"
    if not (kmeans / "kmeans.json").is_file():
        shutil.rmtree(ROOT, ignore_errors=True)
        run_cli("synth", "librispeech", "--out", corpus, "--speakers", "10", "--minutes", "1.5")
        run_cli("partition", "--corpus", corpus, "--out", partition, "--clients", "2")
        run_cli("kmeans", "--partition", partition, "--out", kmeans, "minibatch.n_init=3", "sample_fraction=1")
    return partition, kmeans


def rows(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def bytes_per_client_round(out: Path) -> float:
    messages = read_messages(out / "messages.jsonl")
    train = [m for m in messages if m["type"] == "train"]
    pairs = len(train) / 2  # one message each way per client and round
    return sum(m["bytes"] for m in train) / pairs / 2  # per direction


def model_bytes(preset: str, num_classes: int) -> int:
    from fedhubert.config import load_config
    from fedhubert.model.config import ModelConfig
    from fedhubert.model.hubert import build_hubert

    model = build_hubert(load_config(ModelConfig, None, [f"preset={preset}"]), num_classes)
    return sum(p.numel() * 4 for p in model.state_dict().values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--preset", default="small")
    args = parser.parse_args()
    partition, kmeans = inputs()
    num_classes = json.loads((kmeans / "kmeans.json").read_text())["num_clusters"]
    common = [
        "--partition",
        partition,
        "--kmeans",
        kmeans,
        "--preset",
        args.preset,
        "--force",
        *TRAIN,
        f"federation.cpus_per_client={available_cpus()}",
    ]
    out = ROOT / "run-float32"
    started = time.perf_counter()
    run_cli(
        "pretrain",
        "--out",
        out,
        "--rounds",
        args.rounds,
        "--local-steps",
        args.local_steps,
        f"evaluate_every={args.rounds}",
        *common,
    )
    wall = time.perf_counter() - started
    loop = json.loads((out / "pretrain.json").read_text())["seconds"]
    local = sum(r["train_time_s"] for r in rows(out, "client"))
    out16 = ROOT / "run-bfloat16"
    run_cli("pretrain", "--out", out16, "--rounds", 1, "--local-steps", 2, "transfer=bfloat16", *common)
    size = model_bytes(args.preset, num_classes)
    b32, b16 = bytes_per_client_round(out), bytes_per_client_round(out16)
    figures = [
        {
            "figure": f"{args.rounds} rounds x 2 clients x {args.local_steps} steps: wall time",
            "ours": round(wall, 1),
            "unit": "s",
        },
        {"figure": "sum of the clients' local training time", "ours": round(local, 1), "unit": "s"},
        {
            "figure": "federated overhead of the rounds (server loop / local - 1)",
            "ours": round(loop / local - 1, 3),
            "unit": "ratio",
            "target": "< 0.15",
            "met": loop / local - 1 < 0.15,
        },
        {
            "figure": "fixed start-up (SuperLink, Ray, ServerApp; wall - loop)",
            "ours": round(wall - loop, 1),
            "unit": "s",
        },
        {
            "figure": "overhead end to end, start-up included (wall / local - 1)",
            "ours": round(wall / local - 1, 3),
            "unit": "ratio",
        },
        {"figure": "model size (float32)", "ours": round(size / 2**20, 2), "unit": "MiB"},
        {
            "figure": "bytes per client per round and direction / model, float32",
            "ours": round(b32 / size, 4),
            "unit": "x",
            "target": "<= 1.0 (+ .npy headers)",
            "met": b32 / size <= 1.001,
        },
        {
            "figure": "bytes per client per round and direction / model, bfloat16",
            "ours": round(b16 / size, 4),
            "unit": "x",
            "target": "<= 0.5 (+ .npy headers)",
            "met": b16 / size <= 0.501,
        },
    ]
    write_results(
        "federated",
        figures,
        notes=f"{args.preset} preset on CPU, clients one after another with "
        f"{available_cpus()} threads each; wall time includes SuperLink and Ray start-up",
    )


if __name__ == "__main__":
    main()
