"""Drills at 1,600 one-speaker clients in simulation: 5% of the clients fail during federated k-means and during
pretraining (they raise, send garbage, their process dies, or one hangs past the round's fitted timeout), and each
stage runs twice with the same failures: once through, once killed outright mid-run (SIGKILL of the stage and all its
Flower processes) and resumed. Both runs must complete, record every planned failure that was asked for, named with
its reason, and end the same (codebook, labels and history; final weights).

Inputs: the corpus, partition and k-means labels of `benchmarks/scale.py` at N = 1600 (build/bench/scale/1600/).
The failures come from tests/reliability/hostile_app (fedhubert's own ClientApp, misbehaving where the plan says):

- k-means: the recipe's K = 100, lloyd.fraction = 0.1, at most 6 Lloyd rounds, the initial codebook from 200 clients.
  80 clients (seeded) misbehave whenever they are asked: 48 raise, 24 send a NaN statistic, 8 exit (the Ray worker
  dies). One more client, sampled for Lloyd round 3, hangs for 150 s there (past the fitted timeout: 3x the last
  round + 60 s). The kill comes once round 4 is sent.
- pretraining: the tiny preset, m = 80 a round (5%), 4 rounds of 1 local step, 1-2 s crops. 80 clients (seeded)
  misbehave in every round they are sampled: 40 raise, 16 send a NaN, 8 a tensor of the wrong shape, 8 leave one out,
  8 exit. One more client, sampled for round 2, hangs there for 150 s. The kill comes once round 3 is sent.

Which client is sampled where follows the stages' own seeded sampling (by seed and round, over the clients still in
the stage), replayed here to place the hang; the checks below would catch a replay that went wrong.

    python benchmarks/drills_scale.py [--quick]

--quick: N = 160 (8 failing clients in each stage, m = 16), no verdicts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _common import write_results
from fedhubert.fl.records import read_messages
from fedhubert.fl.runtime import reaper
from fedhubert.model.checkpoint import load_checkpoint
from scale import TRAIN, corpus, inputs

NAME = "drills_scale"
HOSTILE_APP = Path(__file__).resolve().parents[1] / "tests" / "reliability" / "hostile_app"
FEDHUBERT = str(Path(sys.executable).parent / "fedhubert")
SEED = 0
SHARE = 0.05
HANG_S = 150
KMEANS_ROUNDS, KMEANS_FRACTION, INIT_CLIENTS, KMEANS_HANG_ROUND, KMEANS_KILL_ROUND = 6, 0.1, 200, 3, 4
PRETRAIN_ROUNDS, PRETRAIN_HANG_ROUND, PRETRAIN_KILL_ROUND = 4, 2, 3
KMEANS_MIX = {"raise": 0.6, "garbage": 0.3, "exit": 0.1}
PRETRAIN_MIX = {"raise": 0.5, "nan": 0.2, "shape": 0.1, "missing": 0.1, "exit": 0.1}


def failing(n: int, mix: dict[str, float], salt: int) -> dict[int, str]:
    """A seeded SHARE of the n clients, each with its behaviour, in the proportions of `mix`."""
    rng = np.random.default_rng([SEED, n, salt])
    clients = [int(c) for c in rng.choice(n, size=max(len(mix), round(SHARE * n)), replace=False)]
    counts = {b: int(round(share * len(clients))) for b, share in mix.items()}
    counts[next(iter(mix))] += len(clients) - sum(counts.values())
    behaviours = [b for b, count in counts.items() for _ in range(count)]
    return dict(zip(clients, behaviours, strict=True))


def kmeans_sample(round_: int, active: list[int], share: float = 1.0, most: int | None = None) -> list[int]:
    """The replay of `fedhubert.labels.federated._Server.sample`."""
    size = min(len(active), max(1, math.ceil(share * len(active))), most or len(active))
    if size == len(active):
        return active
    rng = np.random.default_rng([SEED, round_])
    return sorted(int(c) for c in rng.choice(active, size=size, replace=False))


def kmeans_plan(n: int) -> tuple[dict, dict[int, str], int]:
    """The hostile app's plan for the k-means drill, the failing clients and the client that hangs."""
    bad = failing(n, KMEANS_MIX, 1)
    steps = ["init", "labels", *(f"stats:{r}" for r in range(1, KMEANS_ROUNDS + 1))]
    active = list(range(n))
    asked = kmeans_sample(0, active, most=INIT_CLIENTS)
    active = [c for c in active if c not in bad or c not in asked]
    for round_ in range(1, KMEANS_HANG_ROUND):
        asked = kmeans_sample(round_, active, KMEANS_FRACTION)
        active = [c for c in active if c not in bad or c not in asked]
    hang = next(c for c in kmeans_sample(KMEANS_HANG_ROUND, active, KMEANS_FRACTION) if c not in bad)
    plan = {str(c): dict.fromkeys(steps, behaviour) for c, behaviour in bad.items()}
    plan[str(hang)] = {f"stats:{KMEANS_HANG_ROUND}": "stall"}
    return plan, bad, hang


def pretrain_plan(n: int, m: int) -> tuple[dict, dict[int, str], int]:
    bad = failing(n, PRETRAIN_MIX, 2)
    rng = np.random.default_rng([SEED, PRETRAIN_HANG_ROUND])
    sampled = sorted(int(c) for c in rng.choice(list(range(n)), size=m, replace=False))
    hang = next(c for c in sampled if c not in bad)
    plan = {str(c): {str(r): b for r in range(1, PRETRAIN_ROUNDS + 1)} for c, b in bad.items()}
    plan[str(hang)] = {str(PRETRAIN_HANG_ROUND): "stall"}
    return plan, bad, hang


def environment(plan_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FEDHUBERT_PROGRESS": "0",
        "FEDHUBERT_DRILL_PLAN": str(plan_path),
        "FEDHUBERT_DRILL_STALL_S": str(HANG_S),
    }


def run(args: list[str], env: dict[str, str], log: Path, kill_when=None) -> dict:
    """`fedhubert <args>` to its end, or killed with all its Flower processes once `kill_when(out)` holds."""
    out = Path(args[args.index("--out") + 1]) if "--out" in args else Path(args[args.index("--resume") + 1])
    started = time.perf_counter()
    with open(log, "a", encoding="utf-8") as sink:
        process = subprocess.Popen([FEDHUBERT, *args], stdout=sink, stderr=subprocess.STDOUT, env=env)
        killed = False
        while process.poll() is None:
            if kill_when is not None and kill_when(out):
                for pid in [process.pid, *reaper.run_processes(out / "flwr")]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                process.wait(timeout=60)
                reaper.end_processes(reaper.run_processes(out / "flwr"))
                killed = True
                break
            time.sleep(0.2)
    return {"returncode": process.returncode, "killed": killed, "wall_s": round(time.perf_counter() - started, 1)}


def fresh(*folders: Path) -> None:
    """Remove an earlier drill's runs and logs first: the kill watches the run's messages.jsonl, which must be this
    run's."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        folder.with_name(folder.name + ".log").unlink(missing_ok=True)


def sent(kind: str, round_: int):
    def ready(out: Path) -> bool:
        path = out / "messages.jsonl"
        if not path.is_file():
            return False
        lines = path.read_text(encoding="utf-8").splitlines()[:-1]  # the last line may be half-written
        return any(f'"round": {round_}' in line and kind in line and "to_client" in line for line in lines)

    return ready


def asked_at(out: Path) -> dict[tuple[str, int | None], set[int]]:
    """(message type, round) -> the clients sent it."""
    asked: dict[tuple[str, int | None], set[int]] = {}
    for m in read_messages(out / "messages.jsonl"):
        if m.get("direction") == "to_client" and m.get("client") is not None:
            asked.setdefault((m["type"], m["round"]), set()).add(int(m["client"]))
    return asked


def placed(failed: list[dict]) -> list[tuple]:
    """Who failed where (the reasons name node and actor ids, which differ between runs)."""
    return [(f["client"], f["stage"], f["round"]) for f in failed]


def kmeans_drill(n: int, partition: Path, features: Path, root: Path) -> dict:
    plan, bad, hang = kmeans_plan(n)
    plan_path = root / "kmeans-plan.json"
    plan_path.write_text(json.dumps(plan))
    env = environment(plan_path)
    overrides = [
        "--seed",
        str(SEED),
        "minibatch.n_init=1",
        f"lloyd.max_rounds={KMEANS_ROUNDS}",
        f"lloyd.fraction={KMEANS_FRACTION}",
        f"lloyd.init_clients={INIT_CLIENTS}",
        "reference=false",
        f"feature_dir={features}",
        f"federation.app={HOSTILE_APP}",
    ]
    through, killed = root / "kmeans-through", root / "kmeans-killed"
    fresh(through, killed)
    runs = {
        "through": run(
            ["kmeans", "--partition", str(partition), "--out", str(through), "--force", *overrides],
            env,
            root / "kmeans-through.log",
        ),
        "killed": run(
            ["kmeans", "--partition", str(partition), "--out", str(killed), "--force", *overrides],
            env,
            root / "kmeans-killed.log",
            kill_when=sent("query.kmeans_stats", KMEANS_KILL_ROUND),
        ),
    }
    runs["resumed"] = run(["kmeans", "--resume", str(killed)], env, root / "kmeans-killed.log")
    record = {"planned": len(bad), "hang_client": hang, "runs": runs}
    if runs["through"]["returncode"] or runs["resumed"]["returncode"] or not runs["killed"]["killed"]:
        return {**record, "completed": False}
    a, b = (json.loads((p / "kmeans.json").read_text()) for p in (through, killed))
    failed = {f["client"]: f for f in a["failed_clients"]}
    asked = asked_at(through)
    steps = {"query.kmeans_init": "init", "query.kmeans_stats": "stats", "query.kmeans_labels": "labels"}
    expected: set[int] = set()
    for (kind, round_), clients in asked.items():
        for client in clients:
            if client in bad and kind in steps:
                expected.add(client)
            if client == hang and kind == "query.kmeans_stats" and round_ == KMEANS_HANG_ROUND:
                expected.add(client)
    hang_reason = failed.get(hang, {}).get("reason", "")
    untimed = lambda history: [{k: v for k, v in row.items() if k != "seconds"} for row in history]  # noqa: E731
    same_labels = all(
        (through / f"client_{c}" / "train.km").read_bytes() == (killed / f"client_{c}" / "train.km").read_bytes()
        for c in range(n)
        if (through / f"client_{c}" / "train.km").is_file()
    )
    return {
        **record,
        "completed": True,
        "stage_s": a["seconds"],
        "lloyd_rounds": len(a["history"]),
        "failed": len(failed),
        "failed_by_stage": {
            s: sum(1 for f in failed.values() if f["stage"] == s) for s in {f["stage"] for f in failed.values()}
        },
        "expected_failures": len(expected),
        "failures_match_plan": set(failed) == expected,
        "unexpected_failures": sorted(set(failed) - expected)[:10],
        "missed_failures": sorted(expected - set(failed))[:10],
        "all_named_with_reason": all(f.get("reason") for f in failed.values()),
        "hang": {"client": hang, "round": KMEANS_HANG_ROUND, "reason": hang_reason},
        "hang_timed_out": "no reply within" in hang_reason,
        "resume_same_codebook": bool(
            np.array_equal(np.load(through / "codebook.npy"), np.load(killed / "codebook.npy"))
        ),
        "resume_same_history": untimed(a["history"]) == untimed(b["history"]),
        "resume_same_failures": placed(a["failed_clients"]) == placed(b["failed_clients"]),
        "resume_same_labels": same_labels,
        "labelled_clients": len(a["clients"]),
    }


def pretrain_drill(n: int, m: int, partition: Path, kmeans: Path, root: Path) -> dict:
    plan, bad, hang = pretrain_plan(n, m)
    plan_path = root / "pretrain-plan.json"
    plan_path.write_text(json.dumps(plan))
    env = environment(plan_path)
    common = [
        "--partition", str(partition), "--kmeans", str(kmeans), "--preset", "tiny", "--rounds", str(PRETRAIN_ROUNDS),
        "--local-steps", "1", "--force", "--seed", str(SEED), f"strategy.fraction={m / n!r}", "strategy.min_clients=1",
        f"evaluate_every={PRETRAIN_ROUNDS}", f"federation.app={HOSTILE_APP}", *TRAIN,
    ]  # fmt: skip
    through, killed = root / "pretrain-through", root / "pretrain-killed"
    fresh(through, killed)
    runs = {
        "through": run(["pretrain", "--out", str(through), *common], env, root / "pretrain-through.log"),
        "killed": run(
            ["pretrain", "--out", str(killed), *common],
            env,
            root / "pretrain-killed.log",
            kill_when=sent('"train"', PRETRAIN_KILL_ROUND),
        ),
    }
    runs["resumed"] = run(["pretrain", "--resume", str(killed)], env, root / "pretrain-killed.log")
    record = {"planned": len(bad), "sampled": m, "hang_client": hang, "runs": runs}
    if runs["through"]["returncode"] or runs["resumed"]["returncode"] or not runs["killed"]["killed"]:
        return {**record, "completed": False}

    def failures(out: Path) -> list[dict]:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r.get("kind") == "failure"]

    got = failures(through)
    pairs = {(f["round"], f["client"]) for f in got}
    asked = asked_at(through)
    expected = {
        (round_, c)
        for (kind, round_), clients in asked.items()
        if kind == "train"
        for c in clients
        if c in bad or (c == hang and round_ == PRETRAIN_HANG_ROUND)
    }
    hang_reason = next((f["reason"] for f in got if f["client"] == hang), "")
    x = load_checkpoint(through / "checkpoints" / "final.pt")["state_dict"]
    y = load_checkpoint(killed / "checkpoints" / "final.pt")["state_dict"]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("reason",)} for r in rs]  # noqa: E731
    return {
        **record,
        "completed": True,
        "failed": len(got),
        "expected_failures": len(expected),
        "failures_match_plan": pairs == expected,
        "unexpected_failures": sorted(pairs - expected)[:10],
        "missed_failures": sorted(expected - pairs)[:10],
        "all_named_with_reason": all(f.get("reason") for f in got),
        "hang": {"client": hang, "round": PRETRAIN_HANG_ROUND, "reason": hang_reason},
        "hang_timed_out": "no reply" in hang_reason or "timed out" in hang_reason,
        "resume_same_weights": x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x),
        "resume_same_failures": strip(got) == strip(failures(killed)),
    }


def figures_for(kmeans: dict, pretrain: dict, n: int, quick: bool) -> list[dict]:
    def check(name: str, ok: bool) -> dict:
        return {
            "figure": name,
            "ours": "yes" if ok else "no",
            "unit": "",
            "target": "yes",
            "met": None if quick else ok,
        }

    figures = []
    for stage, record in (("k-means", kmeans), ("pretraining", pretrain)):
        done = record["completed"]
        figures.append(check(f"{stage} at N={n}, 5% failing: both runs complete", done))
        if not done:
            continue
        named = record["failures_match_plan"] and record["all_named_with_reason"]
        figures += [
            {
                "figure": "  failures recorded / the plan's asked for"
                + (" (client-rounds)" if stage != "k-means" else ""),
                "ours": f"{record['failed']} / {record['expected_failures']}",
                "unit": "",
            },
            check("  every failure the plan's, each named with its reason", named),
            check("  the hung client left out at the fitted timeout", record["hang_timed_out"]),
        ]
        if stage == "k-means":
            same = all(record[k] for k in ("resume_same_codebook", "resume_same_history", "resume_same_failures",
                                            "resume_same_labels"))  # fmt: skip
            figures.append(check("  killed and resumed: same codebook, history, failures, labels", same))
            figures.append({"figure": "  stage time (run through)", "ours": record["stage_s"], "unit": "s"})
        else:
            same = record["resume_same_weights"] and record["resume_same_failures"]
            figures.append(check("  killed and resumed: same final weights and failures", same))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="N = 160, no verdicts")
    args = parser.parse_args()
    n, m = (160, 16) if args.quick else (1600, 80)
    started = time.perf_counter()
    partition, kmeans, made = inputs(n, *corpus(n))
    root = partition.parent / "drills"
    root.mkdir(parents=True, exist_ok=True)
    kmeans_record = kmeans_drill(n, partition, kmeans / "features", root)
    print(f"drills_scale: k-means: {json.dumps({k: v for k, v in kmeans_record.items() if k != 'runs'})}", flush=True)
    pretrain_record = pretrain_drill(n, m, partition, kmeans, root)
    print(f"drills_scale: pretraining: {json.dumps({k: v for k, v in pretrain_record.items() if k != 'runs'})}")
    write_results(
        NAME,
        figures_for(kmeans_record, pretrain_record, n, args.quick),
        ("QUICK CHECK (N=160, no verdicts); " if args.quick else "")
        + f"one-speaker clients of benchmarks/scale.py's synthetic corpus; failures from tests/reliability/hostile_app "
        f"(5% of the clients in each stage, seeded; one more hangs {HANG_S} s); each stage run through and killed "
        "(SIGKILL of the stage and its Flower processes) mid-run, then resumed, with the same plan",
        extra={
            "quick": args.quick,
            "seconds": round(time.perf_counter() - started),
            "inputs": made,
            "kmeans": kmeans_record,
            "pretraining": pretrain_record,
        },
    )


if __name__ == "__main__":
    main()
