"""What every federated training stage configures: its rounds, how it reaches its clients, how the server aggregates,
and client-level privacy (kept free of Flower imports: the CLI reads it for --help)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from fedhubert.config import param
from fedhubert.train.config import TrainConfig

# What the round loop and Flower write into a training stage's output folder (a stage adds its plot and summary);
# --force replaces them as a whole.
# The server's held-out audio a evaluation covers by default (benchmarks/scale.py measures its cost at HuBERT Base).
EVAL_SECONDS = 200.0
ROUNDS_OUTPUTS = ("checkpoints", "clients", "metrics.jsonl", "messages.jsonl", "tensorboard", "flwr", "audit")


@dataclass
class FederationConfig:
    # Read by the fedhubert command that starts the Flower run, not by the ServerApp: under a user's own `flwr run`,
    # Flower's federation config decides these, so setting one there is refused (fl.tasks).
    LAUNCHER_KEYS: ClassVar[dict[str, str]] = {
        "superlink": "the federation's address in pyproject.toml ([tool.flwr.federations])",
        "root_certificates": "the federation's root-certificates in pyproject.toml",
        "cpus_per_client": "--federation-config 'client-resources-num-cpus=N'",
        "gpus_per_client": "--federation-config 'client-resources-num-gpus=X'",
        "timeout_s": "`flwr stop RUN_ID`",
        "app": "the app folder given to `flwr run`",
    }

    superlink: str | None = param(
        None, "host:port of a running SuperLink (Flower's deployment engine); null: a private local simulation"
    )
    root_certificates: Path | None = param(
        None, "CA certificate for TLS to that SuperLink; null: an insecure connection"
    )
    cpus_per_client: int | None = param(
        None, "simulation: CPU cores reserved for each client (null: the machine's or Slurm's cores shared out)", ge=1
    )
    gpus_per_client: float | None = param(
        None, "simulation: share of a GPU per client (null: from the model's estimated memory; 0 without GPUs)", ge=0
    )
    timeout_s: float = param(7200.0, "stop a run that has not finished after this many seconds", gt=0)
    connect_timeout_s: float = param(
        300.0,
        "wait this long for every client's SuperNode (one per client), then start without those not connected "
        "(named, never sampled) if at least the stage's minimum of clients are; a pool of virtual clients' "
        "SuperNodes that has not connected by then is an error",
        gt=0,
    )
    virtual_clients: bool | None = param(
        None,
        "SuperNodes serve any client of the partition, each message naming its client (every node reads every "
        "client's data: a simulation, or a cluster with shared storage); false: each SuperNode is one client, its "
        "partition-id, as in a real federation; null: true in simulation, false against a SuperLink",
    )
    supernodes: int | None = param(
        None,
        "with virtual clients, the pool of SuperNodes serving the partition's clients: in simulation how many are "
        "started (null: twice the clients that train at once, at most the partition's clients); against a SuperLink "
        "how many to wait for before the first round (null: the first to connect and any that join within 1 s)",
        ge=1,
    )
    app: Path | None = param(
        None,
        "a Flower app folder to run instead of fedhubert's own (its pyproject.toml names the ServerApp and "
        "ClientApp, which may wrap fedhubert's, e.g. a customised client, and declares the run config keys "
        "task, config, out, resume, threads and managed); null: fedhubert's",
    )

    def virtual(self, simulation: bool | None = None) -> bool:
        """Whether messages name their client: `virtual_clients`, or where it is null whether the run is a
        simulation. The ServerApp knows that from its runtime (`simulation`, from `fl.nodes.in_simulation`: `flwr run
        .` against a deployment SuperLink sets no `superlink` key); a fedhubert command, which starts the simulation
        itself unless `superlink` is set, infers it from that key."""
        if self.virtual_clients is not None:
            return self.virtual_clients
        return self.superlink is None if simulation is None else simulation


# What each strategy gets where `strategy.eta` / `strategy.tau` / `strategy.beta_1` are null. FedAdam's: no server
# momentum (benchmarks/server_opt.py: with it, every refined cell's step turned away from the clients' change, cosine
# 0.33-0.60, and collapsed onto a few clusters), tau 1e-3, and eta 1e-2, which moves the model by about the clients'
# mean change; benchmarks/fedadam_seeds.py compares it with eta 5e-3 and 2e-2 over 3 pretraining seeds (README).
# FedAvgM's and FedYogi's are unmeasured beyond the sweep's momentum cells, none of which learnt.
STRATEGY_PRESETS: dict[str, dict[str, float]] = {
    "fedavgm": {"eta": 1.0},
    "fedadam": {"eta": 1e-2, "tau": 1e-3, "beta_1": 0.0},
    "fedyogi": {"eta": 1e-3, "tau": 1e-3},
}


@dataclass
class StrategyConfig:
    name: Literal["fedavg", "fedavgm", "fedadam", "fedyogi"] = param(
        "fedavg",
        "Flower strategy aggregating the clients: FedAvg (measured best for short runs; see README), FedAvgM (server "
        "momentum), FedAdam or FedYogi (adaptive server optimisers)",
    )
    eta: float | None = param(
        None,
        "server learning rate: FedAdam/FedYogi move a weight by at most about eta a round (Flower's default 0.1 "
        "wrecks a transformer); FedAvgM scales its momentum step by it; null: the strategy's preset (STRATEGY_PRESETS)",
        gt=0,
    )
    beta_1: float | None = param(
        None,
        "FedAdam/FedYogi first-moment decay (server momentum; 0: none); null: the strategy's preset (0.9 where it has "
        "none)",
        ge=0,
        lt=1,
    )
    beta_2: float = param(0.99, "FedAdam/FedYogi second-moment decay", ge=0, lt=1)
    tau: float | None = param(
        None,
        "FedAdam/FedYogi adaptivity floor (1e-9 would turn updates into eta * sign); null: the strategy's preset",
        gt=0,
    )
    momentum: float = param(0.9, "FedAvgM server momentum on the clients' mean change", ge=0, lt=1)
    fraction: float = param(1.0, "share of the clients sampled each round", gt=0, le=1)
    min_clients: int = param(2, "a round needs replies from at least this many clients", ge=1)

    def first_moment(self) -> float:
        """beta_1 as configured, or the strategy's preset where null."""
        return self.beta_1 if self.beta_1 is not None else STRATEGY_PRESETS.get(self.name, {}).get("beta_1", 0.9)

    def server_rates(self) -> tuple[float, float | None]:
        """(eta, tau) as configured, or the strategy's preset where null (tau: None for FedAvg and FedAvgM)."""
        preset = STRATEGY_PRESETS.get(self.name, {})
        eta = self.eta if self.eta is not None else preset.get("eta", 1.0)
        tau = self.tau if self.tau is not None else preset.get("tau")
        return eta, tau

    def sample_size(self, num_clients: int) -> int:
        """Clients asked each round: the `fraction`, at least `min_clients`, at most all."""
        return min(max(math.ceil(self.fraction * num_clients), min(self.min_clients, num_clients)), num_clients)


@dataclass
class PrivacyConfig:
    mode: Literal["none", "server", "client"] = param(
        "none",
        "client-level differential privacy: none; server (the server clips each client's update and adds Gaussian "
        "noise to their mean: it protects the released models, and trusts the server); client (each client clips "
        "its update and adds its share of that noise before replying)",
    )
    clip_norm: float | None = param(
        None, "L2 bound on each client's update over all shared tensors (required with mode server)", gt=0
    )
    noise_multiplier: float | None = param(
        0.0,
        "noise standard deviation on the sum of clipped updates, in units of clip_norm (0: clipping only); null: the "
        "smallest that keeps epsilon within target_epsilon over num_rounds rounds of this sampling (bisection on the "
        "accountant; recorded in run.json)",
        ge=0,
    )
    delta: float = param(1e-5, "the delta of (epsilon, delta); must be below 1 / number of clients", gt=0, lt=1)
    target_epsilon: float | None = param(
        None,
        "stop (with a checkpoint) before a round that would take epsilon above this (with noise_multiplier null, the "
        "noise is chosen to reach it after num_rounds rounds); null: no limit",
        gt=0,
    )
    per_layer_clipping: bool = param(
        False,
        "clip each shared tensor to clip_norm x sqrt(its share of the parameters) instead of the update as a whole "
        "(the whole stays within clip_norm; the accounting is the same)",
    )
    adaptive_clipping: bool = param(
        False,
        "adapt the clipping bound each round (from clip_norm) towards target_quantile of the update norms, from a "
        "noised count of unclipped updates (Andrew et al. 2021); part of noise_multiplier goes to that count",
    )
    target_quantile: float = param(
        0.5, "adaptive clipping: share of updates the bound should leave unclipped", gt=0, lt=1
    )
    clip_learning_rate: float = param(0.2, "adaptive clipping: geometric step of the bound per round", gt=0)
    clipped_count_stddev: float | None = param(
        None, "adaptive clipping: noise std on the count of unclipped updates (null: sampled clients / 20)", ge=0
    )
    audit_coordinates: int = param(
        0,
        "keep this many coordinates of every client's change as the server received it (the same random subset of "
        "the shared weights each round) in audit/round_<r>.npz, for audits and leakage studies; 0: none",
        ge=0,
    )


@dataclass
class RoundsConfig:
    """The keys of a federated training stage that the round loop (`fedhubert.fl.rounds`) and the client round
    (`fedhubert.fl.local`) read; a stage's config extends it with its inputs and its model."""

    # Top-level keys that may change when a run is resumed (everything else must match the checkpoint's config).
    RESUMABLE: ClassVar[tuple[str, ...]] = ("num_rounds", "federation", "checkpoint_keep")

    partition: Path | None = param(None, "partition folder made by 'fedhubert partition' (required)")
    kmeans: Path | None = param(None, "k-means folder made by 'fedhubert kmeans' on that partition")
    num_rounds: int = param(10, "federated rounds", ge=1)
    local_steps: int = param(50, "optimizer updates per client per round", ge=1)
    seed: int = param(0, "seed of the initial model, client sampling, crops, masks and dropout", ge=0)
    transfer: Literal["float32", "bfloat16"] = param(
        "float32",
        "precision on the wire: float32 weights, or bfloat16 weights out and bfloat16 changes back (half "
        "the bytes; the server keeps float32)",
    )
    evaluate_every: int = param(1, "server-side evaluation on the held-out set every this many rounds", ge=1)
    eval_subset: str = param("dev-clean", "held-out subset of the partition for server-side evaluation")
    eval_seconds: float | None = param(
        EVAL_SECONDS,
        "server-side evaluation on at most this many seconds of eval_subset: a seeded sample drawn round-robin over "
        "its speakers, the same at every evaluation (null: all of it)",
        gt=0,
    )
    checkpoint_every: int = param(1, "checkpoint every this many rounds (and after the last)", ge=1)
    checkpoint_keep: int | None = param(
        3,
        "round checkpoints kept: the newest this many (older ones are deleted as new ones are written; best.pt and "
        "final.pt are kept besides); null: keep every one",
        ge=1,
    )
    round_timeout_s: float = param(
        3600.0,
        "longest wait for a round's replies; once a round has had every reply, the next waits 3x that round's "
        "time + round_timeout_slack_s (at most this), so a dead or hung client costs a round little more than the "
        "round needs",
        gt=0,
    )
    round_timeout_slack_s: float = param(
        60.0,
        "what a round's wait adds to 3x the time of the last round that had every reply (rounds of a few seconds "
        "whose clients never pause can lower it)",
        ge=0,
    )
    valid_seconds: float = param(
        120.0,
        "each client validates on at most this many seconds of its validation split after training (the same "
        "utterances every round); 0: no client validation",
        ge=0,
    )
    train: TrainConfig = param(TrainConfig(), "each client's local trainer (its optim.lr is the client learning rate)")
    strategy: StrategyConfig = param(StrategyConfig(), "server aggregation")
    federation: FederationConfig = param(FederationConfig(), "how the clients are reached")
    privacy: PrivacyConfig = param(PrivacyConfig(), "client-level differential privacy of the released models")
