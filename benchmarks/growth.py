"""What a pretraining run writes and keeps as it grows: disk written per round at m = 40 HuBERT Base clients,
checkpoint bytes kept after 100 rounds, and the privacy accountant's time per round after 1,000 rounds.

Inputs: the corpus, partitions and k-means labels of `benchmarks/scale.py` (build/bench/scale/160/: one client per
speaker, 0.2 min each), made once. Each `fedhubert pretrain` runs through scale.py's sampled runner; beside it a
watcher lists the run's folder every 0.25 s and, as each round's checkpoint appears whole (with its checksum
sidecar), records the bytes under the folder by kind (checkpoints, messages.jsonl, metrics, TensorBoard, logs,
per-client heads, other).

- disk (Base): N = 160, m = 40 sampled, 3 rounds of 1 local step (scale.py Part C's crops), the defaults otherwise.
  Written per round, checkpoints excluded: (bytes after round 3 - bytes after round 1) / 2, by kind; what the
  figure reaches over 1,000 rounds. Target: under 1 MB per round (the messages record alone once wrote ~27 KB a
  message, 80 messages a round at m = 40: 2.2 MB).
- checkpoints (tiny): N = 160, m = 2, 100 rounds of 1 local step, `checkpoint_keep` at its default: the round
  checkpoints kept at the end and their bytes with best.pt and final.pt; the same count at Base, from the size of the
  Base run's round checkpoint. Target: the count is checkpoint_keep (bounded, not growing with rounds).
- accountant: `fedhubert.fl.privacy.Accountant` (mode server, 40 of 2,338 clients a round, as a LibriSpeech
  speaker study) spending 1,000 rounds; the time of a round's accounting (spend the round, read epsilon,
  ask whether the next round would exceed the target), median of rounds 1-10 against rounds 991-1000 (rounds 11-990
  composed in one call, the same state). Target: the late rounds within 1.5x of the early ones (constant time; a
  replay of every past round would be ~100x).

    python benchmarks/growth.py [--quick]

--quick: the small preset at m = 4 for the disk part, 20 rounds for checkpoints, 100 accountant rounds; no verdicts.
"""

from __future__ import annotations

import argparse
import re
import statistics
import threading
import time
from pathlib import Path

import psutil

from _common import write_results
from fedhubert.fl.config import PrivacyConfig, RoundsConfig
from fedhubert.fl.privacy import Accountant
from scale import MEMORY_TRAIN, TRAIN, corpus, inputs, pretrain

NAME = "growth"
CLIENTS = 160
DISK_SAMPLED, DISK_ROUNDS = 40, 3
CKPT_SAMPLED, CKPT_ROUNDS = 2, 100
ACCOUNTANT_ROUNDS, ACCOUNTANT_CLIENTS, ACCOUNTANT_SAMPLED = 1000, 2338, 40
TARGET_ROUND_BYTES = 1e6
TARGET_ACCOUNTANT_RATIO = 1.5
_ROUND_FILE = re.compile(r"round_(\d+)\.pt")


def kind_of(relative: Path) -> str:
    """The kind of a file under a run's folder, for the byte counts."""
    name, parts = relative.name, relative.parts
    if parts[0] == "checkpoints" or name.endswith((".pt", ".pt.sha256")):
        return "heads" if "head" in name or "heads" in parts else "checkpoints"
    if name.startswith("events.out.tfevents") or "tensorboard" in parts:
        return "tensorboard"
    if name == "messages.jsonl":
        return "messages"
    if name.startswith("metrics") or name.endswith((".jsonl", ".json", ".csv")):
        return "metrics"
    if name.endswith((".log", ".txt")):
        return "logs"
    return "other"


def folder_bytes(out: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path in out.rglob("*"):
        try:
            if path.is_file():
                kind = kind_of(path.relative_to(out))
                sizes[kind] = sizes.get(kind, 0) + path.stat().st_size
        except OSError:  # a file replaced while we looked
            continue
    return sizes


class Watcher(threading.Thread):
    """Records `folder_bytes(out)` once per round, when that round's checkpoint and its sidecar are both there."""

    def __init__(self, out: Path, interval_s: float = 0.25):
        super().__init__(daemon=True)
        self.out, self.interval_s = out, interval_s
        self.after_round: dict[int, dict[str, int]] = {}
        self.round_checkpoint_bytes: dict[int, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            folder = self.out / "checkpoints"
            for path in folder.glob("round_*.pt") if folder.is_dir() else []:
                match = _ROUND_FILE.fullmatch(path.name)
                r = int(match[1]) if match else None
                if r is None or r in self.after_round or not path.with_name(path.name + ".sha256").is_file():
                    continue
                try:
                    self.round_checkpoint_bytes[r] = path.stat().st_size
                except OSError:
                    continue
                self.after_round[r] = folder_bytes(self.out)
            self.done.wait(self.interval_s)


def watched_run(label: str, n: int, m: int, rounds: int, preset: str, train: list[str], limit: float) -> dict:
    corpus_path, stamp = corpus(n)
    partition, kmeans, made = inputs(n, corpus_path, stamp)
    out = partition.parent / "runs" / f"{label}-m{m}-{preset}"
    watcher = Watcher(out)
    watcher.start()
    record = pretrain(
        label, n, m, partition, kmeans, preset=preset, rounds=rounds, local_steps=1, train=train, extra=[], limit=limit
    )
    watcher.done.set()
    watcher.join()
    kept = sorted((out / "checkpoints").glob("*.pt"))
    small = {k: record[k] for k in ("label", "status", "failure", "wall_s", "median_round_s", "round_s", "overrides")}
    return {
        **small,
        "clients": n,
        "sampled": m,
        "preset": preset,
        "rounds": rounds,
        "inputs": made,
        "bytes_after_round": {str(r): sizes for r, sizes in sorted(watcher.after_round.items())},
        "round_checkpoint_bytes": max(watcher.round_checkpoint_bytes.values(), default=None),
        "final_bytes": folder_bytes(out),
        "checkpoints_kept": [p.name for p in kept],
        "checkpoint_bytes_kept": sum(p.stat().st_size for p in kept),
    }


def per_round(run: dict, first: int, last: int) -> dict[str, float] | None:
    """Bytes written per round between rounds `first` and `last`, by kind, checkpoints excluded."""
    after = run["bytes_after_round"]
    if str(first) not in after or str(last) not in after:
        return None
    a, b = after[str(first)], after[str(last)]
    kinds = sorted((set(a) | set(b)) - {"checkpoints"})
    return {k: (b.get(k, 0) - a.get(k, 0)) / (last - first) for k in kinds}


def accountant_times(rounds: int) -> dict:
    """Rounds 1-10 and the last 10 spent one by one, as a run does; the rounds between are composed in one call,
    which leaves the accountant in the state they would (its ledger is run-length: noise scale, count)."""
    privacy = PrivacyConfig(mode="server", clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, target_epsilon=1e9)
    accountant = Accountant(privacy, ACCOUNTANT_CLIENTS, ACCOUNTANT_SAMPLED)
    epsilon = 0.0

    def spend(count: int) -> list[float]:
        nonlocal epsilon
        seconds = []
        for _ in range(count):
            started = time.perf_counter()
            accountant.spend_round()
            epsilon = accountant.epsilon()
            accountant.next_round_exceeds()
            seconds.append(time.perf_counter() - started)
        return seconds

    first = spend(10)
    accountant._compose(1.0, rounds - 20)
    last = spend(10)
    assert accountant.rounds == rounds
    early, late = statistics.median(first), statistics.median(last)
    return {
        "rounds": rounds,
        "clients": ACCOUNTANT_CLIENTS,
        "sampled": ACCOUNTANT_SAMPLED,
        "noise_multiplier": privacy.noise_multiplier,
        "epsilon_at_end": round(epsilon, 4),
        "early_ms": round(early * 1e3, 3),
        "late_ms": round(late * 1e3, 3),
        "ratio": round(late / early, 3),
    }


def figures_for(disk: dict, ckpt: dict, accountant: dict, quick: bool) -> list[dict]:
    def verdict(ok: bool) -> bool | None:
        return None if quick else ok

    figures = []
    written = per_round(disk, 1, disk["rounds"])
    if disk["status"] == "completed" and written is not None:
        total = sum(written.values())
        figures += [
            {
                "figure": f"disk written per round, checkpoints excluded (m={disk['sampled']}, {disk['preset']})",
                "ours": round(total / 1e3, 1),
                "unit": "kB",
                "target": f"< {TARGET_ROUND_BYTES / 1e3:.0f}",
                "met": verdict(total < TARGET_ROUND_BYTES),
            },
            {
                "figure": "  of which, by kind",
                "ours": ", ".join(f"{k} {v / 1e3:.1f}" for k, v in written.items() if v),
                "unit": "kB",
            },
            {"figure": "  over 1,000 rounds", "ours": round(total * 1000 / 1e9, 3), "unit": "GB"},
            {
                "figure": f"round checkpoint ({disk['preset']})",
                "ours": round(disk["round_checkpoint_bytes"] / 1e9, 3),
                "unit": "GB",
            },
        ]
    else:
        figures.append({"figure": "disk per round", "ours": f"not measured: {disk['failure']}", "unit": ""})
    keep = RoundsConfig().checkpoint_keep
    rounds_kept = [n for n in ckpt["checkpoints_kept"] if _ROUND_FILE.fullmatch(n)]
    if ckpt["status"] == "completed":
        figures.append(
            {
                "figure": f"round checkpoints kept after {ckpt['rounds']} rounds (checkpoint_keep={keep})",
                "ours": len(rounds_kept),
                "unit": "files",
                "target": f"= {keep}",
                "met": verdict(len(rounds_kept) == keep),
            }
        )
        figures.append(
            {
                "figure": f"checkpoint bytes kept after {ckpt['rounds']} rounds, tiny (+ best.pt, final.pt)",
                "ours": round(ckpt["checkpoint_bytes_kept"] / 1e6, 2),
                "unit": "MB",
            }
        )
        if disk.get("round_checkpoint_bytes"):
            at_base = len(ckpt["checkpoints_kept"]) * disk["round_checkpoint_bytes"]
            figures.append(
                {
                    "figure": f"  the same {len(ckpt['checkpoints_kept'])} files at {disk['preset']}",
                    "ours": round(at_base / 1e9, 2),
                    "unit": "GB",
                }
            )
    else:
        figures.append({"figure": "checkpoints kept", "ours": f"not measured: {ckpt['failure']}", "unit": ""})
    figures += [
        {
            "figure": f"accountant per round, rounds 1-10 / last 10 of {accountant['rounds']}",
            "ours": f"{accountant['early_ms']} / {accountant['late_ms']}",
            "unit": "ms",
        },
        {
            "figure": f"accountant time per round, round {accountant['rounds']} / round 1",
            "ours": accountant["ratio"],
            "unit": "x",
            "target": f"<= {TARGET_ACCOUNTANT_RATIO}",
            "met": verdict(accountant["ratio"] <= TARGET_ACCOUNTANT_RATIO),
        },
    ]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="small preset, fewer rounds; no verdicts")
    args = parser.parse_args()
    # Summed RSS counts the pages Ray's workers share once per process; the guard's floor on available memory is
    # what protects the machine, so the sum's limit is set near the machine's size.
    limit = 0.95 * psutil.virtual_memory().total
    disk_preset, disk_m = ("small", 4) if args.quick else ("base", DISK_SAMPLED)
    started = time.perf_counter()
    disk = watched_run("growth-disk", CLIENTS, disk_m, DISK_ROUNDS, disk_preset, MEMORY_TRAIN, limit)
    ckpt = watched_run("growth-ckpt", CLIENTS, CKPT_SAMPLED, 20 if args.quick else CKPT_ROUNDS, "tiny", TRAIN, limit)
    accountant = accountant_times(100 if args.quick else ACCOUNTANT_ROUNDS)
    notes = [
        "QUICK CHECK (shrunk sizes, no verdicts)" if args.quick else "",
        f"N={CLIENTS} one-speaker clients of benchmarks/scale.py's synthetic corpus, 1 local step per round, CPU",
        f"disk: {disk_preset} preset, m={disk_m}, {DISK_ROUNDS} rounds; per round = (after round {DISK_ROUNDS} - after "
        "round 1) / 2, by kind, checkpoints excluded (a watcher lists the run's folder as each checkpoint lands)",
        f"checkpoints: tiny preset, m={CKPT_SAMPLED}, the default checkpoint_keep; at Base = the files kept x the Base "
        "round checkpoint",
        f"accountant: mode server, {ACCOUNTANT_SAMPLED} of {ACCOUNTANT_CLIENTS} clients a round, z=1, delta 1e-5; a "
        "round = spend_round + epsilon + next_round_exceeds, median of 10",
    ]
    write_results(
        NAME,
        figures_for(disk, ckpt, accountant, args.quick),
        "; ".join(n for n in notes if n),
        extra={
            "quick": args.quick,
            "seconds": round(time.perf_counter() - started),
            "runs": {"disk": disk, "checkpoints": ckpt},
            "accountant": accountant,
        },
    )


if __name__ == "__main__":
    main()
