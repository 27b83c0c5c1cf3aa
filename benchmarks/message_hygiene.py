"""Does a long run with clients that time out leave messages behind? Issue 42's message hygiene, over many rounds.

One `fedhubert pretrain` of the tiny preset on one-speaker clients (the scale benchmark's corpus and federated k-means
labels, build/bench/scale/<N>/), `--rounds` rounds (1,000) of `--sampled` clients, through the reliability drills'
hostile ClientApp (tests/reliability/hostile_app): each client stalls in a round with probability `--stall-rate`
(5%, a seeded plan fixed before the run) for `--stall-s` seconds, longer than the round's wait (3x the last round
that had every reply + `round_timeout_slack_s`, here `--slack-s`), so its round gives up on it and its reply comes
late. The simulation runs `--actors` client actors (8: the stage is given that many cores through
SLURM_CPUS_PER_TASK), since a stalled client holds its actor while it sleeps and with 2 actors two stalls would hold
every one, timing out the round's healthy clients too. Read per round, from the round rows the
stage writes (metrics.jsonl): the instructions, replies and payload objects stored in Flower's link state
(in simulation, the in-memory LinkState of the flwr-simulation process), the stragglers still held, the late
replies dropped so far; and, sampled every second by this script, the resident memory of the flwr-simulation process
(ServerApp, link state and Flower's dispatcher) and of the SuperLink.

Targets (issue 42): the stored messages and the memory stay flat: each stored count's largest value in the last 100
rounds no larger than in the first 100 (what is in flight is bounded; its line-fit trend is reported with its SE),
and the flwr-simulation RSS growing by less than 5 MB per 100 rounds after the first 50 rounds (line fit, with its
SE).

The run's records stay in build/bench/hygiene/ as it goes (the stage's metrics.jsonl and rss.jsonl); a run cut off is
summarised as far as it went with `--summarise` (the figures say which rounds they cover).

    python benchmarks/message_hygiene.py [--rounds 1000] [--clients 40] [--sampled 10] [--stall-rate 0.05]
    python benchmarks/message_hygiene.py --summarise     # its figures again (give the flags the run was made with)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

import scale
from _common import read_jsonl, write_results

ROOT = Path(__file__).resolve().parents[1] / "build" / "bench" / "hygiene"
HOSTILE_APP = Path(__file__).resolve().parents[1] / "tests" / "reliability" / "hostile_app"
TARGET_RSS_MB_PER_100_ROUNDS = 5.0
WARM_ROUNDS = 50  # memory settles (allocator, caches) before the trend is fitted
TRAIN = [
    "train.device=cpu",
    "train.data.min_seconds=1",
    "train.data.max_seconds=2",
    "train.data.batch_seconds=4",
    "valid_seconds=0",
]


def stall_plan(clients: int, rounds: int, rate: float, seed: int) -> dict[str, dict[str, str]]:
    """The hostile app's plan: each client stalls in each round with probability `rate` (seeded)."""
    draw = random.Random(seed)
    plan: dict[str, dict[str, str]] = {}
    for client in range(clients):
        stalls = {str(r): "stall" for r in range(1, rounds + 1) if draw.random() < rate}
        if stalls:
            plan[str(client)] = stalls
    return plan


class MemoryByRound(threading.Thread):
    """Every second: the RSS of the run's flwr-simulation process and SuperLink, and the rounds written so far to the
    stage's metrics.jsonl; one row per new round to `path` (the memory when that round's row appeared)."""

    def __init__(self, root_pid: int, metrics: Path, path: Path):
        super().__init__(daemon=True)
        self.root_pid, self.metrics, self.path = root_pid, metrics, path
        self.rounds_seen = 0
        self._offset = 0
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def _rss_by_kind(self) -> dict[str, int]:
        found: dict[str, int] = {}
        try:
            tree = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.Error:
            return found
        for proc in tree:
            try:
                kind = scale.classify(proc.name(), proc.cmdline())
                if kind in ("simulation", "superlink"):
                    found[kind] = found.get(kind, 0) + proc.memory_info().rss
            except psutil.Error:
                continue
        return found

    def _new_rounds(self) -> list[int]:
        try:
            if self.metrics.stat().st_size < self._offset:
                self._offset = 0  # a new file
            with self.metrics.open() as handle:
                handle.seek(self._offset)
                text = handle.read()
        except OSError:
            return []
        complete, _, _ = text.rpartition("\n")
        self._offset += len(complete) + 1 if complete else 0
        rounds = []
        for line in complete.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("kind") == "train":
                rounds.append(int(row["round"]))
        return rounds

    def run(self) -> None:
        started = time.monotonic()
        with self.path.open("a") as sink:
            while not self._halt.wait(1.0):
                rounds = self._new_rounds()
                if not rounds:
                    continue
                rss = self._rss_by_kind()
                for round_ in rounds:
                    row = {"round": round_, "t_s": round(time.monotonic() - started, 1)}
                    row.update({f"{kind}_rss_mb": round(value / 1e6, 2) for kind, value in rss.items()})
                    sink.write(json.dumps(row) + "\n")
                sink.flush()
                self.rounds_seen = max(self.rounds_seen, *rounds)


def slope(points: list[tuple[float, float]]) -> dict | None:
    """Least-squares slope of (round, value) per 100 rounds, with its standard error (residuals, n - 2 dof)."""
    if len({x for x, _ in points}) < 3:
        return None
    x, y = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    sxx = float(((x - x.mean()) ** 2).sum())
    growth = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    residuals = y - (y.mean() + growth * (x - x.mean()))
    se = float(np.sqrt((residuals**2).sum() / (len(x) - 2) / sxx))
    return {"per_100_rounds": round(100 * growth, 6), "se_per_100_rounds": round(100 * se, 6), "points": len(x)}


def summarise(args: argparse.Namespace, run: dict) -> None:
    out = ROOT / "run"
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "train"]
    memory = read_jsonl(ROOT / "rss.jsonl")
    if not rows:
        sys.exit(f"no round rows in {out / 'metrics.jsonl'}: nothing to summarise")
    last = rows[-1]["round"]
    command = run.get("command", [])
    planned = int(command[command.index("--rounds") + 1]) if "--rounds" in command else args.rounds
    keys = ("link_instructions", "link_replies", "link_objects", "stragglers_held")
    link = {key: [(r["round"], r.get(key, 0)) for r in rows] for key in keys}
    stage = scale._read_json(out / "run.json") or {}
    trends = {key: slope(values) for key, values in link.items()}
    warm = min(WARM_ROUNDS, last // 2)  # a short check run fits its second half
    late = [r for r in memory if r["round"] > warm and "simulation_rss_mb" in r]
    rss_trend = slope([(r["round"], r["simulation_rss_mb"]) for r in late])
    failed = sum(r.get("failed", 0) for r in rows)
    asked = sum(r.get("clients", 0) + r.get("failed", 0) for r in rows)
    flat_rss = rss_trend is not None and rss_trend["per_100_rounds"] < TARGET_RSS_MB_PER_100_ROUNDS
    covered = f"rounds 1-{last} of {planned}" + ("" if last >= planned else " (cut off)")
    figures = [
        {
            "figure": "rounds run",
            "ours": last,
            "unit": "rounds",
            "target": f"{planned}",
            "met": last >= planned,
        },
        {"figure": "client rounds that timed out or failed", "ours": failed, "unit": f"of {asked}"},
        {"figure": "late replies dropped", "ours": rows[-1].get("late_replies_so_far", 0), "unit": "replies"},
        *(
            {
                "figure": f"{key.replace('_', ' ')}, max in the first / last 100 rounds",
                "ours": f"{max(v for r, v in values if r <= 100)} / {max(v for r, v in values if r > last - 100)}",
                "unit": "stored",
                "target": "last <= first",
                "met": max(v for r, v in values if r > last - 100) <= max(v for r, v in values if r <= 100),
            }
            for key, values in link.items()
        ),
        *(
            {
                "figure": f"{key.replace('_', ' ')}, trend",
                "ours": f"{trend['per_100_rounds']:+.4f} +- {trend['se_per_100_rounds']:.4f}" if trend else "",
                "unit": "/100 rnd",
            }
            for key, trend in trends.items()
        ),
        {
            "figure": f"flwr-simulation RSS trend after round {warm}",
            "ours": f"{rss_trend['per_100_rounds']:+.2f} +- {rss_trend['se_per_100_rounds']:.2f}" if rss_trend else "",
            "unit": "MB/100 r",
            "target": f"< {TARGET_RSS_MB_PER_100_ROUNDS:g}",
            "met": flat_rss if rss_trend else None,
        },
    ]
    if memory:
        figures.append(
            {
                "figure": "flwr-simulation RSS (first / last row)",
                "ours": f"{memory[0].get('simulation_rss_mb')} / {memory[-1].get('simulation_rss_mb')}",
                "unit": "MB",
            }
        )
    write_results(
        "message_hygiene",
        figures,
        notes=(
            f"{covered}; tiny preset, {args.clients} one-speaker clients, {args.sampled} sampled a round, "
            f"{args.stall_rate:.0%} stall for {args.stall_s:g} s (a round waits 3x the last full round + "
            f"{args.slack_s:g} s), "
            f"{args.actors} client actors, hostile drill app; link counts from the round rows, RSS sampled every 1 s"
        ),
        extra={
            "run": {**run, "stage_git_commit": stage.get("git_commit"), "stage_status": stage.get("status")},
            "settings": {k: v for k, v in vars(args).items() if k != "summarise"},
            "by_round": {
                "round": [r["round"] for r in rows],
                "seconds": [r.get("seconds") for r in rows],
                "failed": [r.get("failed", 0) for r in rows],
                "late_replies_so_far": [r.get("late_replies_so_far", 0) for r in rows],
                **{key: [v for _, v in values] for key, values in link.items()},
            },
            "memory_by_round": memory,
            "link_trends": trends,
            "simulation_rss_trend": rss_trend,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=40, help="one-speaker clients (N)")
    parser.add_argument("--sampled", type=int, default=10, help="clients asked a round (m)")
    parser.add_argument("--stall-rate", type=float, default=0.05, help="chance a client stalls in a round")
    parser.add_argument("--stall-s", type=float, default=7.0, help="how long a stalled client waits before training")
    parser.add_argument(
        "--slack-s", type=float, default=3.0, help="round_timeout_slack_s: a round waits 3x the last full round + this"
    )
    parser.add_argument(
        "--actors", type=int, default=8, help="client actors (a stalled client holds one while it sleeps)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summarise", action="store_true", help="only the figures of the run already there")
    args = parser.parse_args()
    record_path = ROOT / "run.json"
    if args.summarise:
        summarise(args, json.loads(record_path.read_text()) if record_path.is_file() else {})
        return
    corpus_path, stamp = scale.corpus(args.clients)
    partition, kmeans, _ = scale.inputs(args.clients, corpus_path, stamp)
    ROOT.mkdir(parents=True, exist_ok=True)
    (ROOT / "rss.jsonl").unlink(missing_ok=True)
    plan = ROOT / "stall_plan.json"
    plan.write_text(json.dumps(stall_plan(args.clients, args.rounds, args.stall_rate, args.seed)) + "\n")
    out = ROOT / "run"
    overrides = [
        f"strategy.fraction={scale.fraction_for(args.sampled, args.clients)!r}",
        f"evaluate_every={args.rounds}",
        f"checkpoint_every={args.rounds}",
        f"round_timeout_slack_s={args.slack_s:g}",
        f"seed={args.seed}",
        f"federation.app={HOSTILE_APP}",
        *TRAIN,
    ]
    command = scale.pretrain_command(partition, kmeans, out, "tiny", args.rounds, 1, overrides)
    env = {
        **os.environ,
        "FEDHUBERT_DRILL_PLAN": str(plan),
        "FEDHUBERT_DRILL_STALL_S": f"{args.stall_s:g}",
        "SLURM_CPUS_PER_TASK": str(args.actors),  # how the stage is told its cores: one client actor per core
    }
    shutil.rmtree(out, ignore_errors=True)  # the sampler must not read an earlier run's rows
    print(f"message_hygiene: {' '.join(command[2:])}", flush=True)
    started = time.perf_counter()
    with (ROOT / "console.log").open("w") as console:
        process = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        sampler = MemoryByRound(process.pid, out / "metrics.jsonl", ROOT / "rss.jsonl")
        sampler.start()
        returncode = process.wait()
        sampler.stop()
        sampler.join()
    run = {
        "command": ["fedhubert", *command[3:]],
        "returncode": returncode,
        "wall_s": round(time.perf_counter() - started, 1),
        "console_log": str(ROOT / "console.log"),
    }
    record_path.write_text(json.dumps(run, indent=2) + "\n")
    summarise(args, run)


if __name__ == "__main__":
    main()
