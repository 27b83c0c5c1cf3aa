"""fedhubert at thousands of one-speaker clients: round time against the federation's size and the clients sampled,
and the simulation's memory against the clients sampled.

Inputs (made once, under build/bench/scale/): one synthetic corpus of one-speaker clients (`fedhubert synth
librispeech`, 0.2 min per speaker, all training speakers in train-clean-100 and 2 held-out speakers in dev-clean, so
that the server's evaluation stays tiny), made for the largest N asked for; per N a `natural` partition of it (one
client per speaker; smaller N sample N speakers with `num_clients=N`) and federated k-means labels (the recipe's K,
one MiniBatchKMeans initialisation, 3 Lloyd rounds, no centralized reference), in build/bench/scale/<N>/.

Each `fedhubert pretrain` runs as a child process; a thread samples it and its descendants every 0.5 s with psutil
(CPU times and RSS as last seen, and each process's peak RSS, VmHWM), grouped by kind: the `flwr-simulation` process
(ServerApp and Flower's dispatcher), the client workers (Ray workers: `ray::ClientAppActor`, `ray::IDLE`), Ray's own
daemons and agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`), the SuperLink, its SuperExec, the `flwr` CLI and
the stage's own process. A guard kills a run whose processes hold more than --memory-limit-gib or that leaves the
machine under 1.5 GiB available, and records it as failed for memory. The SuperNodes of a run are read from its logs
(`supernodes`; null when no line says it), and, beside them, from the `flwr run --federation-config` it started.

- rounds (Part A): N = 16 / 160 / 1600 clients, 16 sampled per round, tiny preset, 2 local steps, 6 rounds: set-up
  (the stage's wall time minus its rounds), round 1 (which also starts Flower's client actors and builds their
  models), time per round (median of rounds 2 and later), CPU time of the simulation process against the client
  workers. Target: round time at 1600 within 1.2x of round time at 16.
- sampled (Part B): N = 1600, m = 8 / 32 / 128 sampled, same settings: round time against m and the per-client
  overhead: per round, its time x clients trained at once / m - the mean local training time of its clients
  (`train_time_s` of the clients' rows), and the median over rounds 2 and later (round 1 also starts Flower's client
  actors and builds their models, a cost paid once per run). Clients trained at once: from the `flwr run
  --federation-config` the stage started (CPUs for the simulation / CPUs per client, and GPUs alike), beside the
  number of Ray client actors seen. Target: <= 0.1 s.
- memory (Part C): HuBERT Base, N = 1600, m = 4 / 16 / 40, each twice (--memory-repeats), 1 round of 1 local step
  of 1-2 s crops, FedAvg; then FedAdam and server-side DP (privacy.mode=server, clip 1, z = 1) once each at m = 40.
  Per run: the flwr-simulation process's peak RSS (VmHWM), every process kind's, and the machine's memory in use
  (total - available) at its peak above what it was just before the run (the median of 5 samples over 2 s); a
  least-squares line peak = fixed + growth x m over all FedAvg runs, for the simulation and for the machine, with
  the growth's standard error. Targets (issue 42): simulation < 4 GiB and machine < 10 GiB above idle at m = 40
  with 2 client actors; growth < 0.1 GB per sampled client. Also the per-client overhead at the largest m (its one
  round x clients at once / m - the clients' mean training time) and its share of a 10-update client round; target
  <= 10%. The held-out set (2 speakers) is evaluated before round 1 and after it.

Every run writes its record to results/scale/n<N>-<label>.json as it finishes; a later run of the benchmark reads
back a completed run of the same command from there instead of running it again (--rerun: run everything), so a
benchmark cut off resumes where it stopped.

    python benchmarks/scale.py [--part rounds|sampled|memory|all] [--quick] [--extra-overrides KEY=VALUE ...]
    python benchmarks/scale.py --replot     # the table and plot again from results/scale.json, running nothing

--quick shrinks everything (N = 16 / 160, m = 8 / 16, memory with the small preset at m = 2 / 4); its figures carry
no verdict. --extra-overrides go to every pretrain call (e.g. federation.supernodes=4) and are recorded with each
run. A part run on its own keeps the other parts of an earlier results/scale.json (of the same --quick setting).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

from _common import RESULTS, read_jsonl, run_cli, write_results

ROOT = Path(__file__).resolve().parents[1] / "build" / "bench" / "scale"
NAME = "scale"
MINUTES = 0.2  # speech per speaker
HELDOUT_SPEAKERS = 2  # in dev-clean: the server's evaluation set
SEED = 0
KMEANS = ["minibatch.n_init=1", "lloyd.max_rounds=3", "reference=false"]  # the recipe's K, made cheap

SIZES, QUICK_SIZES = (16, 160, 1600), (16, 160)
ROUNDS_SAMPLED = 16
SAMPLED, QUICK_SAMPLED = (8, 32, 128), (8, 16)
MEMORY_CLIENTS = 1600
MEMORY_SAMPLED, QUICK_MEMORY_SAMPLED = (4, 16, 40), (2, 4)
MEMORY_REPEATS = 2  # runs per m, so that the growth per sampled client has an error bar
# At Part C's largest m, beside FedAvg: the server optimiser's moments and server-side DP's noise are model copies.
MEMORY_VARIANTS = {
    "fedadam": ["strategy.name=fedadam"],
    "dp-server": ["privacy.mode=server", "privacy.clip_norm=1.0", "privacy.noise_multiplier=1.0"],
}
ROUNDS, LOCAL_STEPS = 6, 2  # rounds 2-6 give the round-time median (round 1 also starts the actors)
# The trainer of Parts A and B: short crops keep each client's own work small, so the rounds' overhead shows.
TRAIN = ["train.device=cpu", "train.data.min_seconds=1", "train.data.max_seconds=2", "train.data.batch_seconds=8"]
# Part C: one update of two 2 s crops per client, enough to hold a full client state in every worker.
MEMORY_TRAIN = [
    "train.device=cpu",
    "train.data.min_seconds=1",
    "train.data.max_seconds=2",
    "train.data.batch_seconds=4",
]

TARGET_ROUND_RATIO = 1.2
TARGET_OVERHEAD_S = 0.1
TARGET_GROWTH_GB = 0.1
TARGET_PEAK_GIB = 4.0  # flwr-simulation's VmHWM at m = 40, FedAvg (issue 42)
TARGET_MACHINE_GIB = 10.0  # the machine's memory in use above idle at m = 40, 2 client actors (issue 42)
INTERVAL_S = 0.5
CELLS = RESULTS / "scale"  # one results file per run as it finishes, read back by a later run of the same settings
AVAILABLE_FLOOR = 1.5 * 2**30  # the guard stops a run that leaves the machine less than this


# ----------------------------------------------------------------------------------------------------- inputs
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def corpus(train_speakers: int, root: Path = ROOT, heldout: int = HELDOUT_SPEAKERS) -> tuple[Path, dict]:
    """The corpus under `root`: at least `train_speakers` one-speaker training clients (an existing larger one is
    reused, the smaller N sample from it), plus `heldout` speakers in dev-clean."""
    path, stamp_path = root / "corpus", root / "corpus.json"
    stamp = _read_json(stamp_path)
    if (
        stamp
        and stamp.get("train_speakers", 0) >= train_speakers
        and stamp.get("heldout_speakers") == heldout
        and stamp.get("minutes") == MINUTES
        and stamp.get("seed") == SEED
        and (path / "SPEAKERS.TXT").is_file()
    ):
        return path, stamp
    train_speakers = max(train_speakers, 2)
    shutil.rmtree(path, ignore_errors=True)
    stamp_path.unlink(missing_ok=True)
    # The shares are exact: with (N-1, D-1) the largest-remainder split (each subset at least 1) gives N and D.
    command = [
        "synth",
        "librispeech",
        "--out",
        path,
        "--speakers",
        train_speakers + heldout,
        "--minutes",
        MINUTES,
        "--seed",
        SEED,
        f"subsets.train-clean-100={train_speakers - 1}",
        "subsets.train-clean-360=0",
        "subsets.train-other-500=0",
        f"subsets.dev-clean={heldout - 1}",
        "subsets.test-clean=0",
    ]
    started = time.perf_counter()
    run_cli(*command)
    stamp = {
        "train_speakers": train_speakers,
        "heldout_speakers": heldout,
        "minutes": MINUTES,
        "seed": SEED,
        "synth_s": round(time.perf_counter() - started, 1),
        "command": ["fedhubert", *map(str, command)],
    }
    stamp_path.parent.mkdir(parents=True, exist_ok=True)
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return path, stamp


def inputs(n: int, corpus_path: Path, corpus_stamp: dict, root: Path = ROOT) -> tuple[Path, Path, dict]:
    """<root>/<n>/partition and kmeans: n one-speaker clients of the corpus, and their labels."""
    base = root / str(n)
    partition, kmeans, stamp_path = base / "partition", base / "kmeans", base / "inputs.json"
    wanted = {
        "clients": n,
        "corpus_train_speakers": corpus_stamp["train_speakers"],
        "minutes": MINUTES,
        "seed": SEED,
        "kmeans": KMEANS,
    }
    stamp = _read_json(stamp_path)
    if stamp and {k: stamp.get(k) for k in wanted} == wanted and (kmeans / "kmeans.json").is_file():
        return partition, kmeans, stamp
    shutil.rmtree(partition, ignore_errors=True)
    shutil.rmtree(kmeans, ignore_errors=True)
    stamp_path.unlink(missing_ok=True)
    every = n >= corpus_stamp["train_speakers"]
    started = time.perf_counter()
    run_cli(
        "partition",
        "--corpus",
        corpus_path,
        "--out",
        partition,
        "--scheme",
        "natural",
        "--seed",
        SEED,
        "natural.speakers_per_client=1",
        "num_clients=null" if every else f"num_clients={n}",
        "train_subsets=[train-clean-100]",
    )
    partition_s = time.perf_counter() - started
    made = json.loads((partition / "partition.json").read_text())["num_clients"]
    if made != n:
        sys.exit(f"the partition {partition} has {made} clients, not {n}")
    started = time.perf_counter()
    run_cli("kmeans", "--partition", partition, "--out", kmeans, "--seed", SEED, *KMEANS)
    kmeans_s = time.perf_counter() - started
    stamp = {**wanted, "partition_s": round(partition_s, 1), "kmeans_s": round(kmeans_s, 1)}
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return partition, kmeans, stamp


# -------------------------------------------------------------------------------------------- process sampling
KINDS = ("simulation", "client_workers", "ray_system", "superlink", "superexec", "flwr_cli", "stage", "other")
# Ray's per-node agents name themselves ray:: too, but train no client.
_RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def classify(name: str, cmdline: list[str]) -> str:
    text = " ".join(cmdline) or name
    heads = " ".join(Path(part).name for part in cmdline[:3]) or name
    if any(agent in text or name.startswith(agent) for agent in _RAY_AGENTS):
        return "ray_system"
    if "ClientAppActor" in text or name.startswith("ray::") or text.startswith("ray::") or "default_worker.py" in text:
        return "client_workers"
    if "flwr-simulation" in heads or name.startswith("flwr-simulation"):
        return "simulation"
    if "flower-superlink" in heads or name.startswith("flower-superlin"):
        return "superlink"
    if "flower-superexec" in heads or name.startswith("flower-superexe"):
        return "superexec"
    if re.search(r"(^|\s)flwr(\s|$)", heads):
        return "flwr_cli"
    if name in ("raylet", "gcs_server") or "/ray/" in text or "ray_client_server" in text:
        return "ray_system"
    return "other"


def machine_used() -> int:
    """The machine's memory in use (total - available: what other programs could not have), in bytes."""
    memory = psutil.virtual_memory()
    return memory.total - memory.available


def machine_idle(seconds: float = 2.0) -> int:
    """The machine's memory in use before a run: the median of a few samples over `seconds`."""
    samples = []
    for _ in range(5):
        samples.append(machine_used())
        time.sleep(seconds / 5)
    return int(statistics.median(samples))


def _vm_hwm(pid: int) -> int:
    """A process's peak resident set size so far (VmHWM), in bytes; 0 when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Sampler(threading.Thread):
    """Every `interval` s: the root process and all its descendants, each one's CPU times and RSS as last seen and
    its peak RSS (the larger of the sampled RSS and VmHWM); the summed RSS per kind; the Ray client actors alive; the
    `flwr run` command line. Kills the run (its process group, then every descendant by pid) when its processes hold
    more than `limit` bytes or the machine has less than AVAILABLE_FLOOR available."""

    def __init__(self, root_pid: int, interval: float, limit: float):
        super().__init__(daemon=True)
        self.root_pid, self.interval, self.limit = root_pid, interval, limit
        self.procs: dict[tuple[int, float], dict] = {}
        self.kind_rss_peak: dict[str, int] = defaultdict(int)
        self.total_rss_peak = 0
        self.machine_used_peak = 0
        self.actors_alive_peak = 0
        self.samples = 0
        self.flwr_run: list[str] | None = None
        self.killed_for_memory: str | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.root_pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def sample(self) -> None:
        kind_rss: dict[str, int] = defaultdict(int)
        actors = 0
        alive = []
        for proc in self._tree():
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    cpu = proc.cpu_times()
                    rss = proc.memory_info().rss
                    name = proc.name()
                    cmdline = proc.cmdline()
            except psutil.Error:
                continue
            alive.append(proc)
            kind = "stage" if proc.pid == self.root_pid else classify(name, cmdline)
            record = self.procs.setdefault(
                key, {"pid": proc.pid, "kind": kind, "actor": False, "rss_max": 0, "hwm": 0, "cmdline": ""}
            )
            if record["kind"] in ("other", "ray_system") and kind not in ("other", "ray_system"):
                record["kind"] = kind  # a Ray worker is a python process until it names itself
            if kind == "client_workers" and record["kind"] != "client_workers":
                record["kind"] = kind
            if "ClientAppActor" in " ".join(cmdline):
                record["actor"] = True
                actors += 1
            if record["kind"] == "flwr_cli" and "--federation-config" in cmdline:
                self.flwr_run = list(cmdline)
            record.update(
                name=name,
                cmdline=" ".join(cmdline)[:300],
                user=cpu.user,
                system=cpu.system,
                rss_max=max(record["rss_max"], rss),
                hwm=max(record["hwm"], _vm_hwm(proc.pid), rss),
            )
            kind_rss[record["kind"]] += rss
        self.samples += 1
        self.actors_alive_peak = max(self.actors_alive_peak, actors)
        for kind, rss in kind_rss.items():
            self.kind_rss_peak[kind] = max(self.kind_rss_peak[kind], rss)
        total = sum(kind_rss.values())
        self.total_rss_peak = max(self.total_rss_peak, total)
        memory = psutil.virtual_memory()
        available = memory.available
        self.machine_used_peak = max(self.machine_used_peak, memory.total - available)
        if alive and self.killed_for_memory is None and (total > self.limit or available < AVAILABLE_FLOOR):
            self.killed_for_memory = (
                f"stopped by the benchmark's memory guard: the run's processes held {total / 2**30:.1f} GiB "
                f"(limit {self.limit / 2**30:.1f} GiB) with {available / 2**30:.1f} GiB left available on the "
                f"machine (floor {AVAILABLE_FLOOR / 2**30:.1f} GiB)"
            )
            print(f"scale: {self.killed_for_memory}", flush=True)
            try:
                os.killpg(self.root_pid, signal.SIGKILL)
            except OSError:
                pass
            for proc in alive:
                try:
                    proc.kill()
                except psutil.Error:
                    pass

    def leftovers(self, grace_s: float = 15.0) -> list[dict]:
        """Processes of the run still alive `grace_s` after it ended: recorded, then killed by pid."""
        deadline = time.monotonic() + grace_s
        while True:
            left = []
            for (pid, created), record in self.procs.items():
                try:
                    proc = psutil.Process(pid)
                    if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                        left.append((proc, record))
                except psutil.Error:
                    continue
            if not left or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        for proc, _ in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        return [{"pid": r["pid"], "kind": r["kind"], "cmdline": r["cmdline"][:120]} for _, r in left]

    def by_kind(self) -> dict[str, dict]:
        kinds: dict[str, dict] = {}
        for record in self.procs.values():
            entry = kinds.setdefault(
                record["kind"], {"processes": 0, "cpu_user_s": 0.0, "cpu_system_s": 0.0, "peak_rss_bytes": 0}
            )
            entry["processes"] += 1
            entry["cpu_user_s"] += record.get("user", 0.0)
            entry["cpu_system_s"] += record.get("system", 0.0)
            entry["peak_rss_bytes"] = max(entry.get("peak_rss_bytes", 0), record["hwm"])
        for kind, entry in kinds.items():
            entry["cpu_s"] = round(entry["cpu_user_s"] + entry["cpu_system_s"], 2)
            entry["cpu_user_s"] = round(entry["cpu_user_s"], 2)
            entry["cpu_system_s"] = round(entry["cpu_system_s"], 2)
            entry["peak_rss_gib"] = round(entry["peak_rss_bytes"] / 2**30, 3)  # the kind's largest process
            entry["peak_summed_rss_gib"] = round(self.kind_rss_peak.get(kind, 0) / 2**30, 3)
        return {kind: kinds[kind] for kind in KINDS if kind in kinds}


# ---------------------------------------------------------------------------------------------------- one run
def fraction_for(m: int, n: int) -> float:
    """strategy.fraction that makes the round loop ask exactly m of n clients: it samples ceil(fraction x n) (at
    least strategy.min_clients, at most n), so m / n, nudged down where floating point would round it up."""
    fraction = m / n
    while math.ceil(fraction * n) > m:
        fraction = math.nextafter(fraction, 0.0)
    return fraction


def merged(base: list[str], extra: list[str]) -> list[str]:
    """KEY=VALUE overrides, `extra` replacing `base`'s value of a key it repeats."""
    keys = {item.split("=", 1)[0] for item in extra}
    return [item for item in base if item.split("=", 1)[0] not in keys] + list(extra)


_SUPERNODES = (
    re.compile(r"served by (?:a pool of )?(\d+) SuperNode"),
    re.compile(r"\((\d+) simulated SuperNodes\)"),
    re.compile(r"num-supernodes[= :]+(\d+)"),
    re.compile(r"(\d+) SuperNodes?\b"),
    re.compile(r"SuperNodes?[:= ]+(\d+)"),
)


def supernodes_in_logs(out: Path) -> tuple[int | None, str | None]:
    """The number of SuperNodes the run's logs say Flower was started with, and the line that says it. Lines that
    only suggest a number (the server's 'waiting for N clients ... set num-supernodes=N') are skipped."""
    logs = out / "logs"
    files = [logs / "pretrain.log", logs / "flower.log"]
    files += sorted(p for p in logs.glob("*.log") if p not in files) if logs.is_dir() else []
    for pattern in _SUPERNODES:
        for path in files:
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                if "waiting for" in line or "--federation-config" in line:
                    continue
                if match := pattern.search(line):
                    return int(match[1]), f"{path.name}: {line.strip()[:200]}"
    return None, None


def _federation_config(flwr_run: list[str] | None) -> dict[str, float]:
    if not flwr_run or "--federation-config" not in flwr_run:
        return {}
    text = flwr_run[flwr_run.index("--federation-config") + 1]
    values = {}
    for item in text.split():
        key, _, value = item.partition("=")
        try:
            values[key] = float(value)
        except ValueError:
            continue
    return values


def concurrency(federation: dict[str, float]) -> int | None:
    """Clients a Ray simulation trains at once: as many actors as the CPUs (and GPUs) given to the simulation hold
    of one client's resources."""
    cpus, per_cpu = federation.get("init-args-num-cpus"), federation.get("client-resources-num-cpus")
    if not cpus or not per_cpu:
        return None
    workers = math.floor(cpus / per_cpu + 1e-9)
    gpus, per_gpu = federation.get("init-args-num-gpus", 0), federation.get("client-resources-num-gpus", 0)
    if per_gpu and per_gpu > 0:
        workers = min(workers, math.floor(gpus / per_gpu + 1e-9))
    return max(1, workers)


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def pretrain_command(
    partition: Path, kmeans: Path, out: Path, preset: str, rounds: int, local_steps: int, overrides: list[str]
) -> list[str]:
    """`python -m fedhubert pretrain` of these inputs into `out` (--force), with the KEY=VALUE overrides."""
    return [
        sys.executable,
        "-m",
        "fedhubert",
        "pretrain",
        "--partition",
        str(partition),
        "--kmeans",
        str(kmeans),
        "--out",
        str(out),
        "--preset",
        preset,
        "--rounds",
        str(rounds),
        "--local-steps",
        str(local_steps),
        "--force",
        *overrides,
    ]


def pretrain(
    part: str,
    n: int,
    m: int,
    partition: Path,
    kmeans: Path,
    *,
    preset: str,
    rounds: int,
    local_steps: int,
    train: list[str],
    extra: list[str],
    limit: float,
    reuse: bool,
    variant: str = "",
    variant_overrides: tuple[str, ...] = (),
    repeat: int = 1,
) -> dict:
    """One `fedhubert pretrain` in a child process, sampled; its record (a failure is recorded, not raised). The
    record is also written to results/scale/n<N>-<label>.json; with `reuse`, a completed run of the same command
    found there is read back instead of run again (a benchmark cut off resumes where it stopped)."""
    label = f"{part}-m{m}-{preset}" + (f"-{variant}" if variant else "") + (f"-r{repeat}" if repeat > 1 else "")
    out = ROOT / str(n) / "runs" / label
    out.parent.mkdir(parents=True, exist_ok=True)
    overrides = merged(
        [f"strategy.fraction={fraction_for(m, n)!r}", f"evaluate_every={rounds}", *train, *variant_overrides], extra
    )
    command = pretrain_command(partition, kmeans, out, preset, rounds, local_steps, overrides)
    console = out.parent / f"{label}.console.log"
    cell = CELLS / f"n{n}-{label}.json"
    repo = str(Path(__file__).resolve().parents[1])  # paths in the key relative to the checkout: a fresh one resumes
    key = {"command": ["fedhubert", *(c.replace(repo, ".") for c in command[3:])], "repeat": repeat}
    earlier = _read_json(cell) if reuse else None
    if earlier and earlier.get("key") == key and earlier["record"]["status"] == "completed":
        print(f"scale: {label} (N={n}): read back from {cell.relative_to(RESULTS.parent)}", flush=True)
        return {**earlier["record"], "read_back": True}
    print(f"\nscale: {part}: N={n}, m={m}, {preset}: {' '.join(command[2:])}", flush=True)
    idle = machine_idle()
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group, for the memory guard
    )
    sampler = Sampler(process.pid, INTERVAL_S, limit)
    sampler.start()

    def copy() -> None:  # the stage's output to its console log and, indented, to ours
        assert process.stdout is not None
        with open(console, "w", encoding="utf-8") as sink:
            for line in process.stdout:
                sink.write(line)
                sys.stdout.write(f"  {line}")

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    returncode = process.wait()
    wall = time.perf_counter() - started
    sampler.stop()
    sampler.join()
    leftovers = sampler.leftovers()  # also closes the pipe if one of them held it
    reader.join(timeout=30)

    run_record = _read_json(out / "run.json") or {}
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if r.get("kind") == "train"]
    client_rows = [r for r in rows if r.get("kind") == "client"]
    round_s = [float(r["seconds"]) for r in train_rows]
    local = [float(r["train_time_s"]) for r in client_rows if "train_time_s" in r]
    stage_s = run_record.get("elapsed_s")
    completed = returncode == 0 and run_record.get("status") == "completed" and len(round_s) == rounds
    failure = None
    if not completed:
        failure = sampler.killed_for_memory or run_record.get("error") or f"exit code {returncode}"
        if returncode != 0 and not sampler.killed_for_memory:
            failure += f" (exit code {returncode})"
    federation = _federation_config(sampler.flwr_run)
    nodes, nodes_line = supernodes_in_logs(out)
    kinds = sampler.by_kind()
    simulation = kinds.get("simulation", {})
    workers = kinds.get("client_workers", {})
    summary = _read_json(out / "pretrain.json") or {}
    record = {
        "part": part,
        "label": label,
        "variant": variant or "fedavg",
        "repeat": repeat,
        "clients": n,
        "sampled": m,
        "preset": preset,
        "rounds": rounds,
        "local_steps": local_steps,
        "overrides": overrides,
        "extra_overrides": list(extra),
        "command": ["fedhubert", *command[3:]],
        "out": str(out),
        "status": "completed" if completed else "failed",
        "failure": failure,
        "returncode": returncode,
        "wall_s": round(wall, 2),
        "stage_s": stage_s,
        "loop_s": summary.get("seconds"),
        "setup_s": round(stage_s - sum(round_s), 2) if stage_s is not None and round_s else None,
        "round_s": round_s,
        "median_round_s": round(statistics.median(round_s), 3) if round_s else None,
        "clients_per_round": [r.get("clients") for r in train_rows],
        "failed_per_round": [r.get("failed") for r in train_rows],
        "failures": sum(1 for r in rows if r.get("kind") == "failure"),
        "local_train_s": {
            "mean": round(statistics.fmean(local), 4) if local else None,
            "median": round(statistics.median(local), 4) if local else None,
            "client_rounds": len(local),
            "mean_by_round": [
                round(statistics.fmean(times), 4) if times else None
                for times in (
                    [float(c["train_time_s"]) for c in client_rows if c.get("round") == r.get("round")]
                    for r in train_rows
                )
            ],
        },
        "cpu_s": {kind: entry["cpu_s"] for kind, entry in kinds.items()},
        "simulation_cpu_s": simulation.get("cpu_s"),
        "client_workers_cpu_s": workers.get("cpu_s"),
        "simulation_peak_rss_gib": simulation.get("peak_rss_gib"),
        "simulation_peak_rss_gb": round(simulation["peak_rss_bytes"] / 1e9, 4) if simulation else None,
        "client_worker_peak_rss_gib": workers.get("peak_rss_gib"),
        "run_peak_summed_rss_gib": round(sampler.total_rss_peak / 2**30, 3),
        "machine_idle_gib": round(idle / 2**30, 3),
        "machine_above_idle_peak_gib": round((sampler.machine_used_peak - idle) / 2**30, 3),
        "processes": kinds,
        "supernodes": nodes,
        "supernodes_log_line": nodes_line,
        "federation_config": " ".join(f"{k}={v:g}" for k, v in federation.items()) or None,
        "supernodes_federation_config": int(federation["num-supernodes"]) if "num-supernodes" in federation else None,
        "concurrent_workers": {
            "from_federation_config": concurrency(federation),
            "client_actor_processes_seen": sum(1 for r in sampler.procs.values() if r["actor"]),
            "client_actors_alive_at_once": sampler.actors_alive_peak,
        },
        "samples": sampler.samples,
        "sample_interval_s": INTERVAL_S,
        "leftover_processes": leftovers,
        "console_log": str(console),
    }
    if not completed:
        record["log_tail"] = _tail(console)
    verdict = "completed" if completed else f"FAILED: {failure}"
    print(
        f"scale: {label} (N={n}): {verdict}; wall {wall:.1f} s, set-up {record['setup_s']} s, rounds {round_s} s; "
        f"CPU simulation {record['simulation_cpu_s']} s, client workers {record['client_workers_cpu_s']} s; "
        f"simulation peak RSS {record['simulation_peak_rss_gib']} GiB, machine "
        f"{record['machine_above_idle_peak_gib']} GiB above idle; SuperNodes {nodes}",
        flush=True,
    )
    CELLS.mkdir(parents=True, exist_ok=True)
    cell.write_text(json.dumps({"key": key, "record": record}, indent=2) + "\n")
    return record


# ------------------------------------------------------------------------------------------------------ parts
def workers_of(run: dict) -> tuple[int | None, str | None]:
    """Clients trained at once, and where the figure came from: the simulation's resources as the stage passed them
    to `flwr run --federation-config`, else the most Ray client actors seen alive at once."""
    seen = run["concurrent_workers"]
    if seen["from_federation_config"]:
        return seen["from_federation_config"], f"flwr run --federation-config: {run['federation_config']}"
    if seen["client_actors_alive_at_once"]:
        return seen["client_actors_alive_at_once"], "most ray::ClientAppActor processes alive at once"
    return None, None


def tiny_rounds(args, part: str, n: int, m: int, partition: Path, kmeans: Path, limit: float) -> dict:
    """A run of Parts A and B: the tiny preset, ROUNDS rounds of LOCAL_STEPS steps on short crops."""
    return pretrain(
        part,
        n,
        m,
        partition,
        kmeans,
        preset="tiny",
        rounds=ROUNDS,
        local_steps=LOCAL_STEPS,
        train=TRAIN,
        extra=args.extra_overrides,
        limit=limit,
        reuse=not args.rerun,
    )


def part_rounds(args, sizes: list[int], limit: float) -> dict:
    runs = []
    corpus_path, stamp = corpus(max(sizes))
    for n in sizes:
        partition, kmeans, made = inputs(n, corpus_path, stamp)
        run = tiny_rounds(args, "rounds", n, min(ROUNDS_SAMPLED, n), partition, kmeans, limit)
        runs.append({**run, "inputs": made})
    return {"clients": sizes, "sampled": ROUNDS_SAMPLED, "preset": "tiny", "runs": runs}


def part_sampled(args, n: int, sampled: list[int], limit: float) -> dict:
    corpus_path, stamp = corpus(n)
    partition, kmeans, made = inputs(n, corpus_path, stamp)
    runs = []
    for m in sampled:
        run = tiny_rounds(args, "sampled", n, m, partition, kmeans, limit)
        (workers, source) = workers_of(run)
        # Per round: its time x clients trained at once / m, less its own clients' mean training time. Round 1 also
        # starts Flower's client actors and builds their models (a cost paid once per run, in the set-up), so the
        # figure is the median over the later rounds; the per-round values are kept, round 1 included.
        by_round = [
            round(seconds * workers / m - mean, 4)
            for seconds, mean in zip(run["round_s"], run["local_train_s"]["mean_by_round"], strict=False)
            if workers and mean is not None
        ]
        later = by_round[1:]
        run["overhead_s"] = round(statistics.median(later), 4) if run["status"] == "completed" and later else None
        run["overhead_workers"], run["overhead_workers_from"] = workers, source
        run["overhead_by_round_s"] = by_round
        runs.append({**run, "inputs": made})
    return {"clients": n, "sampled": sampled, "preset": "tiny", "runs": runs}


def line_fit(points: list[tuple[float, float]]) -> dict | None:
    """Least squares y = fixed + growth x m over every run (repeats included), with the growth's standard error
    (from the residuals, n - 2 degrees of freedom; null with fewer than 3 points)."""
    if len({m for m, _ in points}) < 2:
        return None
    xs, ys = [float(m) for m, _ in points], [float(y) for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    growth = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    fixed = my - growth * mx
    residuals = [y - (fixed + growth * x) for x, y in zip(xs, ys, strict=True)]
    se = math.sqrt(sum(r * r for r in residuals) / (len(xs) - 2) / sxx) if len(xs) > 2 else None
    return {
        "fixed_gb": round(fixed, 3),
        "growth_gb_per_client": round(growth, 4),
        "growth_se_gb": round(se, 4) if se is not None else None,
        "max_residual_gb": round(max(abs(r) for r in residuals), 3),
        "points": points,
    }


def part_memory(args, n: int, sampled: list[int], preset: str, limit: float) -> dict:
    """FedAvg at each m, MEMORY_REPEATS times; then each of MEMORY_VARIANTS once at the largest m."""
    corpus_path, stamp = corpus(n)
    partition, kmeans, made = inputs(n, corpus_path, stamp)
    plan = [(m, "", (), r) for m in sampled for r in range(1, args.memory_repeats + 1)]
    plan += [(max(sampled), name, tuple(keys), 1) for name, keys in MEMORY_VARIANTS.items()]
    runs = []
    for m, variant, keys, repeat in plan:
        run = pretrain(
            "memory",
            n,
            m,
            partition,
            kmeans,
            preset=preset,
            rounds=1,
            local_steps=1,
            train=MEMORY_TRAIN,
            extra=args.extra_overrides,
            limit=limit,
            reuse=not args.rerun,
            variant=variant,
            variant_overrides=keys,
            repeat=repeat,
        )
        runs.append({**run, "inputs": made})
    fedavg = [r for r in runs if r["variant"] == "fedavg" and r["status"] == "completed"]
    simulation = [(r["sampled"], r["simulation_peak_rss_gb"]) for r in fedavg if r["simulation_peak_rss_gb"]]
    machine = [(r["sampled"], r["machine_above_idle_peak_gib"] * 2**30 / 1e9) for r in fedavg]
    return {
        "clients": n,
        "sampled": sampled,
        "repeats": args.memory_repeats,
        "variants": MEMORY_VARIANTS,
        "preset": preset,
        "runs": runs,
        "fit": line_fit(simulation),
        "machine_fit": line_fit(machine),
    }


# --------------------------------------------------------------------------------------------------- figures
def base_client_overhead(run: dict) -> dict | None:
    """Part C's per-client overhead: its one round x clients trained at once / m - the clients' mean training time
    (one update each), and that overhead's share of a 10-update client round (10 x the measured update + the
    overhead). The round also starts the client actors and builds their models, so the figure is an upper bound."""
    workers, _ = workers_of(run)
    mean = run["local_train_s"]["mean"]
    if run["status"] != "completed" or not workers or mean is None or not run["round_s"]:
        return None
    overhead = run["round_s"][0] * workers / run["sampled"] - mean
    step = mean / run["local_steps"]
    return {"overhead_s": round(overhead, 3), "share_of_10_steps": overhead / (10 * step + overhead)}


def later_rounds_s(run: dict) -> float | None:
    """The median time of rounds 2 and later: round 1 also starts Flower's client actors and builds their models,
    a cost paid once per run (it is kept, and reported, as the run's round 1)."""
    later = run["round_s"][1:] if run["status"] == "completed" else []
    return round(statistics.median(later), 3) if later else None


def _joined(values: list) -> str:
    return " / ".join("failed" if v is None else f"{v:.4g}" for v in values)


def figures_for(parts: dict, quick: bool) -> list[dict]:
    figures = []

    def verdict(ok: bool | None) -> bool | None:
        return None if quick or ok is None else ok

    if (a := parts.get("rounds")) is not None:
        runs = sorted(a["runs"], key=lambda r: r["clients"])
        ns = "/".join(str(r["clients"]) for r in runs)
        ok = [r for r in runs if r["status"] == "completed"]
        figures.append(
            {
                "figure": f"rounds: round time (median of rounds 2+), N={ns} ({a['sampled']} sampled, tiny)",
                "ours": _joined([later_rounds_s(r) for r in runs]),
                "unit": "s",
            }
        )
        figures.append(
            {
                "figure": f"rounds: round 1 (starts the client actors), N={ns}",
                "ours": _joined([r["round_s"][0] if r["status"] == "completed" else None for r in runs]),
                "unit": "s",
            }
        )
        figures.append(
            {
                "figure": f"rounds: set-up before round 1, N={ns}",
                "ours": _joined([r["setup_s"] if r["status"] == "completed" else None for r in runs]),
                "unit": "s",
            }
        )
        biggest = runs[-1]
        figures.append(
            {
                "figure": f"rounds: CPU simulation / client workers, N={biggest['clients']}",
                "ours": _joined([biggest["simulation_cpu_s"], biggest["client_workers_cpu_s"]]),
                "unit": "s",
            }
        )
        first, last = runs[0], runs[-1]
        if len(runs) < 2:
            ours, met = "n/a (one N)", None
        elif first in ok and last in ok and later_rounds_s(first) and later_rounds_s(last):
            ratio = later_rounds_s(last) / later_rounds_s(first)
            ours, met = round(ratio, 3), ratio <= TARGET_ROUND_RATIO
        else:
            ours, met = "failed", False
        figures.append(
            {
                "figure": f"rounds: round time (rounds 2+) at N={last['clients']} / at N={first['clients']}",
                "ours": ours,
                "unit": "x",
                "target": f"<= {TARGET_ROUND_RATIO}",
                "met": verdict(met),
            }
        )
    if (b := parts.get("sampled")) is not None:
        runs = sorted(b["runs"], key=lambda r: r["sampled"])
        ms = "/".join(str(r["sampled"]) for r in runs)
        workers = sorted({r.get("overhead_workers") for r in runs if r.get("overhead_workers")})
        figures.append(
            {
                "figure": f"sampled: round time (median of rounds 2+), m={ms} (N={b['clients']})",
                "ours": _joined([later_rounds_s(r) for r in runs]),
                "unit": "s",
            }
        )
        overheads = [r.get("overhead_s") for r in runs]
        at_once = "/".join(map(str, workers)) or "?"
        figures.append(
            {
                "figure": f"sampled: per-client overhead (rounds 2+), m={ms} ({at_once} at once)",
                "ours": _joined(overheads),
                "unit": "s",
            }
        )
        known = [o for o in overheads if o is not None]
        worst = max(known) if known and len(known) == len(overheads) else None
        figures.append(
            {
                "figure": "sampled: per-client overhead, worst m",
                "ours": round(worst, 4) if worst is not None else "failed",
                "unit": "s",
                "target": f"<= {TARGET_OVERHEAD_S}",
                "met": verdict(worst <= TARGET_OVERHEAD_S if worst is not None else False),
            }
        )
    if (c := parts.get("memory")) is not None:
        runs = sorted(c["runs"], key=lambda r: (r["sampled"], r.get("repeat", 1)))
        fedavg = [r for r in runs if r.get("variant", "fedavg") == "fedavg"]
        ms = sorted({r["sampled"] for r in fedavg})
        top = max(ms)

        def at(m: int, key: str, of: list[dict]) -> list:
            return [r[key] if r["status"] == "completed" else None for r in of if r["sampled"] == m]

        for key, what in (
            ("simulation_peak_rss_gib", "simulation peak RSS"),
            ("machine_above_idle_peak_gib", "machine in use above idle"),
        ):
            figures.append(
                {
                    "figure": f"memory: {what}, m={'/'.join(map(str, ms))} ({c['preset']}, N={c['clients']}; "
                    f"repeats comma-separated)",
                    "ours": " / ".join(
                        ", ".join("failed" if v is None else f"{v:.3g}" for v in at(m, key, fedavg)) for m in ms
                    ),
                    "unit": "GiB",
                }
            )
        for name, fit in (("simulation", c.get("fit")), ("machine", c.get("machine_fit"))):
            figures.append(
                {
                    "figure": f"memory: {name} fixed part of the line fit",
                    "ours": fit["fixed_gb"] if fit else "failed",
                    "unit": "GB",
                }
            )
            se = fit.get("growth_se_gb") if fit else None
            figure = {
                "figure": f"memory: {name} growth per sampled client (+- SE)",
                "ours": (f"{fit['growth_gb_per_client']:.4f}" + (f" +- {se:.4f}" if se is not None else ""))
                if fit
                else "failed",
                "unit": "GB",
            }
            if name == "simulation":
                figure["target"] = f"< {TARGET_GROWTH_GB}"
                figure["met"] = verdict(fit["growth_gb_per_client"] < TARGET_GROWTH_GB if fit else False)
            figures.append(figure)
        tops = [r for r in fedavg if r["sampled"] == top]
        overheads = [o for o in (base_client_overhead(r) for r in tops) if o]
        overhead = min(overheads, key=lambda o: o["overhead_s"]) if overheads else None
        figures.append(
            {
                "figure": f"memory: per-client overhead at m={top} ({c['preset']}, 1 round of 1 step, "
                "actor start-up included; the smaller of the repeats)",
                "ours": overhead["overhead_s"] if overhead else "failed",
                "unit": "s",
            }
        )
        figures.append(
            {
                "figure": f"memory: that overhead in a 10-step {c['preset']} client round (10 x the measured step)",
                "ours": f"{100 * overhead['share_of_10_steps']:.1f}%" if overhead else "failed",
                "unit": "",
                "target": "<= 10%",
                "met": verdict(overhead["share_of_10_steps"] <= 0.10 if overhead else False),
            }
        )
        for key, what, target in (
            ("simulation_peak_rss_gib", "simulation peak RSS", TARGET_PEAK_GIB),
            ("machine_above_idle_peak_gib", "machine in use above idle", TARGET_MACHINE_GIB),
        ):
            values = at(top, key, fedavg)
            worst = None if not values or None in values else max(values)
            figures.append(
                {
                    "figure": f"memory: {what} at m={top}, FedAvg (the larger of the repeats)",
                    "ours": worst if worst is not None else "failed",
                    "unit": "GiB",
                    "target": f"< {target:g} (m=40)",
                    "met": verdict(worst < target if worst is not None else False),
                }
            )
        for r in runs:
            if r.get("variant", "fedavg") == "fedavg":
                continue
            done = r["status"] == "completed"
            figures.append(
                {
                    "figure": f"memory: {r['variant']} at m={r['sampled']}: simulation peak RSS / machine above idle",
                    "ours": _joined(
                        [
                            r["simulation_peak_rss_gib"] if done else None,
                            r["machine_above_idle_peak_gib"] if done else None,
                        ]
                    ),
                    "unit": "GiB",
                }
            )
    return figures


def plot(parts: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    def rounds_panel(ax, runs: list[dict], key: str, label: str) -> None:
        done = [r for r in sorted(runs, key=lambda r: r[key]) if r["status"] == "completed" and later_rounds_s(r)]
        for r in done:
            ax.scatter([r[key]] * (len(r["round_s"]) - 1), r["round_s"][1:], color="tab:blue", s=12, alpha=0.5)
        if done:
            ax.plot([r[key] for r in done], [later_rounds_s(r) for r in done], "o-", color="tab:blue", label=label)
            ax.plot([r[key] for r in done], [r["round_s"][0] for r in done], "s:", color="tab:orange", label="round 1")
        ax.set_xscale("log")
        ax.set_xticks([r[key] for r in runs], [str(r[key]) for r in runs])
        ax.minorticks_off()
        for r in runs:
            if r["status"] != "completed":
                ax.axvline(r[key], color="tab:red", linestyle=":", label=f"{key}={r[key]}: failed")

    ax = axes[0]
    if (a := parts.get("rounds")) is not None:
        rounds_panel(ax, a["runs"], "clients", f"median of rounds 2-{a['runs'][0]['rounds']} ({a['sampled']} sampled)")
        done = [r for r in a["runs"] if r["status"] == "completed"]
        if done:
            smallest = min(done, key=lambda r: r["clients"])
            ax.axhline(
                TARGET_ROUND_RATIO * (later_rounds_s(smallest) or math.nan),
                color="grey",
                linestyle="--",
                label=f"target: {TARGET_ROUND_RATIO}x N={smallest['clients']}",
            )
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
    ax.set(xlabel="clients in the federation (N)", ylabel="round time (s)", title="round time vs N")

    ax = axes[1]
    if (b := parts.get("sampled")) is not None:
        rounds_panel(ax, b["runs"], "sampled", f"median of rounds 2-{b['runs'][0]['rounds']} (N={b['clients']})")
        ideal = [
            (r["sampled"], r["sampled"] * r["local_train_s"]["mean"] / r["overhead_workers"])
            for r in sorted(b["runs"], key=lambda r: r["sampled"])
            if r["status"] == "completed" and r.get("overhead_workers") and r["local_train_s"]["mean"] is not None
        ]
        if ideal:
            ax.plot(*zip(*ideal, strict=True), "--", color="grey", label="m x local training / clients at once")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
    ax.set(xlabel="clients sampled per round (m)", ylabel="round time (s)", title="round time vs m")

    ax = axes[2]
    if (c := parts.get("memory")) is not None:
        done = [r for r in sorted(c["runs"], key=lambda r: r["sampled"]) if r["status"] == "completed"]
        fedavg = [r for r in done if r.get("variant", "fedavg") == "fedavg"]
        for key, fit, color, what in (
            ("simulation_peak_rss_gib", c.get("fit"), "tab:blue", "flwr-simulation VmHWM"),
            ("machine_above_idle_peak_gib", c.get("machine_fit"), "tab:green", "machine above idle"),
        ):
            if fedavg:
                ax.plot([r["sampled"] for r in fedavg], [r[key] for r in fedavg], "o", color=color, label=what)
            if fit:
                xs = [0, max(c["sampled"])]
                ax.plot(
                    xs,
                    [(fit["fixed_gb"] + fit["growth_gb_per_client"] * x) * 1e9 / 2**30 for x in xs],
                    "-",
                    color=color,
                    alpha=0.5,
                    label=f"fit: {fit['fixed_gb']:.2f} GB + {fit['growth_gb_per_client']:.3f} GB x m",
                )
        for marker, r in zip("^vsD", [r for r in done if r.get("variant", "fedavg") != "fedavg"], strict=False):
            ax.plot([r["sampled"]], [r["simulation_peak_rss_gib"]], marker, color="tab:blue", label=f"{r['variant']}")
            ax.plot([r["sampled"]], [r["machine_above_idle_peak_gib"]], marker, color="tab:green")
        for r in c["runs"]:
            if r["status"] != "completed":
                ax.axvline(r["sampled"], color="tab:red", linestyle=":", label=f"m={r['sampled']}: failed")
        ax.axhline(
            TARGET_PEAK_GIB,
            color="tab:blue",
            linestyle="--",
            alpha=0.6,
            label=f"target (simulation): {TARGET_PEAK_GIB:g} GiB",
        )
        ax.axhline(
            TARGET_MACHINE_GIB,
            color="tab:green",
            linestyle="--",
            alpha=0.6,
            label=f"target (machine): {TARGET_MACHINE_GIB:g} GiB",
        )
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
    ax.set(xlabel="clients sampled per round (m)", ylabel="memory (GiB)", title="memory vs m")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--part", choices=("rounds", "sampled", "memory", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="small sizes for a check (no verdicts)")
    parser.add_argument("--sizes", type=int, nargs="+", help="for checks: the N of Part A (B and C take the largest)")
    parser.add_argument("--sampled", type=int, nargs="+", help="for checks: the m of Part B")
    parser.add_argument("--memory-sampled", type=int, nargs="+", help="for checks: the m of Part C")
    parser.add_argument(
        "--extra-overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="appended to every pretrain call (replacing the benchmark's own value of a key)",
    )
    total = psutil.virtual_memory().total
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=round(0.8 * total / 2**30, 1),
        help="stop a run whose processes hold more than this (default: 80%% of the machine's memory)",
    )
    parser.add_argument("--memory-repeats", type=int, default=MEMORY_REPEATS, help="Part C's runs per m")
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="run everything again (default: a completed run with a results/scale/ file of the same command is read "
        "back, so a benchmark cut off resumes where it stopped)",
    )
    parser.add_argument("--replot", action="store_true", help="redo the table and plot of results/scale.json only")
    args = parser.parse_args()
    if args.replot:
        earlier = _read_json(RESULTS / f"{NAME}.json")
        if not earlier or not earlier.get("parts"):
            parser.error(f"--replot: no runs in {RESULTS / f'{NAME}.json'}; run the benchmark first")
        report(
            earlier["parts"],
            earlier["quick"],
            earlier["extra_overrides"],
            earlier["memory_limit_gib"],
            earlier.get("carried", []),
        )
        return
    bad = [item for item in args.extra_overrides if "=" not in item]
    if bad:
        parser.error(f"--extra-overrides takes KEY=VALUE items, not {bad}")
    sizes = sorted(set(args.sizes or (QUICK_SIZES if args.quick else SIZES)))
    biggest = max(sizes)
    sampled = [m for m in (args.sampled or (QUICK_SAMPLED if args.quick else SAMPLED)) if m <= biggest]
    memory_clients = min(MEMORY_CLIENTS, biggest)
    memory_sampled = [
        m
        for m in (args.memory_sampled or (QUICK_MEMORY_SAMPLED if args.quick else MEMORY_SAMPLED))
        if m <= memory_clients
    ]
    if "sampled" in (args.part, "all") and not sampled:
        parser.error(f"no m of Part B fits N={biggest}")
    if "memory" in (args.part, "all") and not memory_sampled:
        parser.error(f"no m of Part C fits N={memory_clients}")
    memory_preset = "small" if args.quick else "base"
    limit = args.memory_limit_gib * 2**30
    wanted = ("rounds", "sampled", "memory") if args.part == "all" else (args.part,)
    # The corpus once, for the largest N of the parts to run (smaller N sample from it).
    needed = {"rounds": biggest, "sampled": biggest, "memory": memory_clients}
    corpus(max(needed[p] for p in wanted))

    date = time.strftime("%Y-%m-%d")
    parts: dict[str, dict] = {}
    for part in wanted:
        started = time.perf_counter()
        if part == "rounds":
            record = part_rounds(args, sizes, limit)
        elif part == "sampled":
            record = part_sampled(args, biggest, sampled, limit)
        else:
            record = part_memory(args, memory_clients, memory_sampled, memory_preset, limit)
        parts[part] = {**record, "date": date, "quick": args.quick, "seconds": round(time.perf_counter() - started)}

    carried = []
    earlier = _read_json(RESULTS / f"{NAME}.json") or {}
    for part, record in (earlier.get("parts") or {}).items():
        if part not in parts and record.get("quick") == args.quick:
            parts[part] = record
            carried.append(f"{part} ({record.get('date')})")
    report(parts, args.quick, args.extra_overrides, args.memory_limit_gib, carried)


def report(parts: dict, quick: bool, extra_overrides: list[str], memory_limit_gib: float, carried: list[str]) -> None:
    """The plot, the table and results/scale.json from the parts' runs."""
    parts = {p: parts[p] for p in ("rounds", "sampled", "memory") if p in parts}
    plot(parts, RESULTS / f"{NAME}.png")
    tiny = next((p["runs"][0] for k, p in parts.items() if k != "memory" and p["runs"]), {})
    corpus_stamp = _read_json(ROOT / "corpus.json") or {}
    said = [
        "QUICK CHECK (shrunk sizes, no verdicts)" if quick else "",
        f"one-speaker clients of a synthetic corpus ({MINUTES} min per speaker asked for, "
        f"{corpus_stamp.get('train_speakers')} training speakers, made in {corpus_stamp.get('synth_s')} s)",
        f"rounds/sampled: tiny preset, {tiny['local_steps']} local steps, {tiny['rounds']} rounds, 1-2 s crops, CPU; "
        "round time = "
        "median of rounds 2 and later (round 1 also starts the client actors); overhead = round x clients at once "
        "/ m - mean local training time, median of rounds 2 and later"
        if "rounds" in parts or "sampled" in parts
        else "",
        f"memory: {parts['memory']['preset']} preset, 1 round of 1 step, "
        f"{parts['memory'].get('repeats', 1)} run(s) per m; simulation peak RSS is the flwr-simulation process's "
        "VmHWM; machine = memory in use (total - available) at its peak, less its median over 2 s before the run"
        if "memory" in parts
        else "",
        "each run's overrides, CPU and RSS per process kind and SuperNodes are in results/scale.json",
        f"extra overrides: {' '.join(extra_overrides)}" if extra_overrides else "",
        f"carried over from an earlier run: {', '.join(carried)}" if carried else "",
    ]
    write_results(
        NAME,
        figures_for(parts, quick),
        "; ".join(item for item in said if item),
        extra={
            "quick": quick,
            "extra_overrides": extra_overrides,
            "memory_limit_gib": memory_limit_gib,
            "carried": carried,
            "corpus": corpus_stamp,
            "plot": str((RESULTS / f"{NAME}.png").relative_to(RESULTS.parent)),
            "parts": parts,
        },
    )


if __name__ == "__main__":
    main()
