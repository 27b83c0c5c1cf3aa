"""What Flower's secure aggregation (SecAgg+) costs fedhubert's pretraining: time and bytes per round of the SecAgg+
app (apps/secagg) against the same app without SecAgg+ (`secagg=false`: Flower's plain fit workflow, same clients,
same training), side by side on one machine.

Each run: the tiny preset, 4 clients (all sampled each round), `--rounds` rounds of `--local-steps` updates, on a
local Flower simulation; `--repeats` runs of each mode, alternated. Measured by the ServerApp (secagg.json in each
run folder):
- time per round: the wall time of the round's fit workflow on the server (sending, the clients' training, the
  SecAgg+ stages, unmasking and aggregation), the median over rounds 2.. of a mode's runs (round 1 also starts
  the simulated clients' processes: reported apart); the clients' own training time beside it, which shows the
  load each mode met on a shared machine;
- bytes per round: the serialized size (protobuf, as Flower puts it on the wire, without the message metadata) of
  every message the server sends to and receives from each client, per SecAgg+ stage (setup, share_keys,
  collect_masked_vectors, unmask) or per plain `train` message; figures are per client and round, averaged over
  clients and rounds;
- the aggregate's error: the largest |aggregate - plain mean of the clients' trained weights| of the last round
  (the clients write their weights with `keep-client-weights`), against the quantization step
  2 x clipping_range / 2^22.
Inputs (a synthetic corpus, an IID partition of 4 clients, federated k-means) are made once under
build/bench/secagg/. Output: benchmarks/results/secagg.json and its rows in benchmarks/RESULTS.md.

    python benchmarks/secagg.py [--rounds 4] [--local-steps 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import yaml

from _common import run_cli, write_results
from fedhubert.fl.config import FederationConfig
from fedhubert.fl.runtime.federation import run_flower_app
from fedhubert.model.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1] / "build" / "bench" / "secagg"
APP = Path(__file__).resolve().parents[1] / "apps" / "secagg"
CLIENTS = 4
EXTRA_STAGES = ("setup", "share_keys", "unmask")  # the exchanges SecAgg+ adds to a round
TRAIN = {"train": {"device": "cpu", "data": {"min_seconds": 2, "max_seconds": 4, "batch_seconds": 16}}}


def inputs() -> tuple[Path, Path]:
    corpus, partition, kmeans = ROOT / "corpus", ROOT / "partition", ROOT / "kmeans"
    if not (kmeans / "kmeans.json").is_file():
        shutil.rmtree(ROOT, ignore_errors=True)
        run_cli("synth", "librispeech", "--out", corpus, "--speakers", "12", "--minutes", "0.5")
        run_cli("partition", "--corpus", corpus, "--out", partition, "--clients", CLIENTS)
        run_cli("kmeans", "--partition", partition, "--out", kmeans, "minibatch.n_init=3", "sample_fraction=1")
    return partition, kmeans


def run(name: str, secagg: bool, partition: Path, kmeans: Path, args: argparse.Namespace) -> dict:
    out = ROOT / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = out / "train.yaml"
    config.write_text(yaml.safe_dump(TRAIN))
    keys = {
        "config": str(config),
        "partition": str(partition),
        "kmeans": str(kmeans),
        "out": str(out),
        "num-server-rounds": args.rounds,
        "local-steps": args.local_steps,
        "preset": "tiny",
        "secagg": secagg,
        "keep-client-weights": True,
    }
    run_flower_app(keys, out, CLIENTS, FederationConfig(app=APP), managed=False)
    summary = json.loads((out / "secagg.json").read_text())
    final = load_checkpoint(out / "final.pt")["state_dict"]
    trained = [np.load(out / "clients" / f"client_{i}" / f"round_{args.rounds:05d}.npz") for i in range(CLIENTS)]
    rounds = summary["rounds"]
    per_round = [
        (sum(s["from_client"] for s in r["stages"].values()), sum(s["to_client"] for s in r["stages"].values()))
        for r in rounds
    ]
    return {
        "summary": summary,
        "first_round_seconds": rounds[0]["seconds"],
        "round_seconds": [r["seconds"] for r in rounds[1:]],
        "client_train_seconds": [r["train_time_s"] for r in rounds[1:]],
        "extra_stage_seconds": [
            sum(v["seconds"] for k, v in r["stages"].items() if k in EXTRA_STAGES) for r in rounds[1:]
        ],
        "sent_bytes": float(np.mean([sent for sent, _ in per_round])),
        "received_bytes": float(np.mean([received for _, received in per_round])),
        "stage_sent_bytes": {
            s: float(np.mean([r["stages"][s]["from_client"] for r in rounds])) for s in rounds[0]["stages"]
        },
        "aggregate_error": max(
            float(np.abs(final[k].double().numpy() - np.mean([t[k] for t in trained], axis=0)).max()) for k in final
        ),
    }


def pooled(runs: list[dict]) -> dict:
    """One mode's repeats: medians of the steady rounds of all of them; bytes (identical across repeats) from the
    first; the largest aggregate error."""
    return {
        **runs[0],
        "first_round_seconds": float(np.median([r["first_round_seconds"] for r in runs])),
        **{
            key: float(np.median([x for r in runs for x in r[key]]))
            for key in ("round_seconds", "client_train_seconds", "extra_stage_seconds")
        },
        "aggregate_error": max(r["aggregate_error"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternated")
    args = parser.parse_args()
    partition, kmeans = inputs()
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"plain": [], "secagg": []}
    for repeat in range(1, args.repeats + 1):  # alternated, so that a change in the machine's load hits both
        for mode in runs:
            runs[mode].append(run(f"{mode}-{repeat}", mode == "secagg", partition, kmeans, args))
    plain, secure = pooled(runs["plain"]), pooled(runs["secagg"])
    model_bytes = 4 * secure["summary"]["parameters"]
    step = secure["summary"]["quantization_step"]
    figures = [
        {"figure": "first round (clients start), plain", "ours": round(plain["first_round_seconds"], 1), "unit": "s"},
        {
            "figure": "first round (clients start), SecAgg+",
            "ours": round(secure["first_round_seconds"], 1),
            "unit": "s",
        },
        {"figure": "time per round, plain", "ours": round(plain["round_seconds"], 2), "unit": "s"},
        {"figure": "time per round, SecAgg+", "ours": round(secure["round_seconds"], 2), "unit": "s"},
        {
            "figure": "SecAgg+ time per round / plain",
            "ours": round(secure["round_seconds"] / plain["round_seconds"], 2),
            "unit": "x",
        },
        {
            "figure": "SecAgg+ setup + share_keys + unmask per round",
            "ours": round(secure["extra_stage_seconds"], 2),
            "unit": "s",
        },
        {"figure": "client training per round, plain", "ours": round(plain["client_train_seconds"], 2), "unit": "s"},
        {"figure": "client training per round, SecAgg+", "ours": round(secure["client_train_seconds"], 2), "unit": "s"},
        {"figure": "bytes sent per client per round, plain", "ours": int(plain["sent_bytes"]), "unit": "B"},
        {"figure": "bytes sent per client per round, SecAgg+", "ours": int(secure["sent_bytes"]), "unit": "B"},
        {
            "figure": "SecAgg+ bytes sent / plain",
            "ours": round(secure["sent_bytes"] / plain["sent_bytes"], 2),
            "unit": "x",
        },
        {
            "figure": "SecAgg+ masked upload per parameter",
            "ours": round(secure["stage_sent_bytes"]["collect_masked_vectors"] / secure["summary"]["parameters"], 2),
            "unit": "B",
        },
        {"figure": "bytes received per client per round, plain", "ours": int(plain["received_bytes"]), "unit": "B"},
        {"figure": "bytes received per client per round, SecAgg+", "ours": int(secure["received_bytes"]), "unit": "B"},
        {
            "figure": "SecAgg+ aggregate error / quantization step",
            "ours": round(secure["aggregate_error"] / step, 3),
            "unit": "x",
        },
    ]
    notes = (
        f"Tiny preset ({secure['summary']['parameters']} parameters, {model_bytes} B in float32), {CLIENTS} clients, "
        f"{args.rounds} rounds of {args.local_steps} local steps, local simulation, {args.repeats} runs of each mode "
        "(alternated). SecAgg+ with "
        f"num_shares {secure['summary']['num_shares']}, reconstruction threshold "
        f"{secure['summary']['reconstruction_threshold']}, clipping range {secure['summary']['clipping_range']:.3g} "
        f"(2 x max |initial weight|), quantization step {step:.3g}. Bytes are the serialized message contents the "
        "ServerApp sent and received per client (metadata excluded), averaged over clients and rounds; time per "
        "round is the server's wall time, the median over rounds 2.. of every run (round 1 also starts the clients' "
        f"processes: its median apart). The machine was shared with other jobs (load average {load_before[0]:.1f} "
        f"before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores): times are indicative (the clients' own "
        "training time shows the load each mode met), bytes exact. The masked vector a "
        "client uploads holds int64 values (Flower's masks are int64 arrays, values mod 2^32), so SecAgg+ doubles "
        "the upload of float32 weights; the server's reply stays float32 (the app casts the dequantized aggregate)."
    )
    write_results(
        "secagg",
        figures,
        notes,
        extra={
            "settings": {"clients": CLIENTS, "rounds": args.rounds, "local_steps": args.local_steps, "preset": "tiny"},
            "model_float32_bytes": model_bytes,
            "runs": {
                f"{mode}-{i}": {k: v for k, v in record.items() if k != "summary"}
                | {"rounds": record["summary"]["rounds"]}
                for mode, records in runs.items()
                for i, record in enumerate(records, 1)
            },
        },
    )


if __name__ == "__main__":
    main()
