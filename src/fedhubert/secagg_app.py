"""Federated HuBERT pretraining with Flower's secure aggregation (SecAgg+): a legacy-API Flower app, the closest
working configuration to `fedhubert pretrain` with SecAgg+ in Flower 1.41 (setup.md, "What leaves a client").

SecAgg+ runs only inside Flower's legacy `DefaultWorkflow` with a `LegacyContext` and a legacy strategy, so this
app does not use fedhubert's round loop (no resume, no per-round checkpoints, no metrics.jsonl or report): the
ServerApp is `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` around a legacy FedAvg (no evaluation), the
ClientApp a `NumPyClient` behind `secaggplus_mod` that trains `local_steps` masked-prediction updates on its
client's manifest and k-means labels with fedhubert's trainer. The server sees only the sum of the clients'
quantized weights; their training metrics travel in the clear. Run it from apps/secagg (README, "Differential
privacy (client level)"); it writes `final.pt` (a fedhubert checkpoint), `secagg.json` (time and bytes per
round and stage) and `logs/secagg.log` in `out`.

Choices:
- Clients send their weights (not their changes) and weigh equally (num_examples 1, max_weight 1): the server
  gets the plain mean of the weights, at the full quantization resolution (a weight w / max_weight below 1
  scales the values before they are quantized, so it coarsens the step by that factor).
- SecAgg+ clips each value to [-clipping_range, clipping_range] and quantizes that range to 2^22 levels, so the
  aggregate is within 2 clipping_range / 2^22 of the mean per coordinate. Flower's default range (8) is unrelated
  to the model; `clipping-range = 0` sets it to twice the largest |weight| of the initial model (1.34 for the tiny
  preset: a step of 1.3e-6, far below a round's changes), room for weights to grow without losing resolution
  to unused range. Changes would need a range tied to the learning rate and the number of local steps, and a
  strategy that adds them back; weights need neither. Each client counts its values outside the range
  (`out_of_range`, a warning at the server): a run that meets them needs a larger `clipping-range`.
- `secagg = false` runs the same app with Flower's plain fit workflow (the benchmark's baseline).
- `keep-client-weights = true` makes each client also write its trained weights to
  `out/clients/client_<i>/round_<r>.npz`, for tests in a simulation (it defeats the purpose anywhere else).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import FitRes, Metrics, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.serde import recorddict_to_proto
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid

from fedhubert.atomic import atomic_write_text
from fedhubert.config import absolute_paths, load_config
from fedhubert.errors import ConfigError
from fedhubert.fl.local import client_place, planned_local_steps, train_locally, with_client_overrides
from fedhubert.fl.tasks import app_root
from fedhubert.model.checkpoint import save_checkpoint
from fedhubert.model.config import PRESET_LR
from fedhubert.model.hubert import build_hubert
from fedhubert.pretrain.client import local_task
from fedhubert.pretrain.config import PretrainConfig
from fedhubert.pretrain.server import read_inputs
from fedhubert.runlog import setup_logging
from fedhubert.train.data import LabelRate
from fedhubert.train.loop import resolve_device
from fedhubert.train.schedule import fit_schedule

log = logging.getLogger("fedhubert.secagg")

# Flat run config keys -> config keys (an empty string or a zero leaves the config's value).
RUN_KEYS = {
    "partition": "partition",
    "kmeans": "kmeans",
    "num-server-rounds": "num_rounds",
    "local-steps": "local_steps",
    "preset": "model.preset",
}
QUANTIZATION_RANGE = 2**22  # SecAgg+'s default levels
STAGE_KEY = "secaggplus_configs"  # the ConfigRecord of SecAgg+'s messages (its "stage" names the stage)


def settings(run_config: Mapping[str, object]) -> tuple[PretrainConfig, Path]:
    """The pretraining config (the YAML `config`, then the flat keys) and the output folder; relative paths resolve
    against the fedhubert checkout. Server and clients build it alike from the run config."""
    root = app_root()
    overrides = []
    for key, target in RUN_KEYS.items():
        value = run_config[key]
        if value not in ("", 0):
            overrides.append(f"{target}={(root / str(value)).resolve() if key in ('partition', 'kmeans') else value}")
    config = str(run_config["config"])
    cfg = load_config(PretrainConfig, (root / config).resolve() if config else None, overrides)
    return absolute_paths(cfg, root), (root / str(run_config["out"] or "runs/secagg")).resolve()


def check_supported(cfg: PretrainConfig, kmeans: dict) -> None:
    """What this app does not do stops it before the first round."""
    problems = []
    if kmeans["label_head"] != "shared":
        problems.append("per-client codebooks (label heads that stay on the clients): use a federated codebook")
    if cfg.strategy.name != "fedavg":
        problems.append(f"strategy.name={cfg.strategy.name}: SecAgg+ gives the server a mean, so FedAvg only")
    if cfg.privacy.mode != "none":
        problems.append(f"privacy.mode={cfg.privacy.mode}: use `fedhubert pretrain` for differential privacy")
    if cfg.transfer != "float32":
        problems.append(f"transfer={cfg.transfer}: SecAgg+ quantizes the weights itself")
    if problems:
        raise ConfigError("the SecAgg+ app does not support " + "; ".join(problems))


def fitted(cfg: PretrainConfig, planned_updates: int) -> PretrainConfig:
    """`cfg` with its learning-rate schedule fitted to the run, as `fedhubert pretrain` sends it to its clients."""
    optim = fit_schedule(cfg.train.optim, planned_updates, PRESET_LR[cfg.model.preset])
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optim=optim))


# ----------------------------------------------------------------------------------------------------- client
class PretrainClient(NumPyClient):
    """One client: the received weights, `local_steps` masked-prediction updates, the trained weights back."""

    def __init__(self, context: Context):
        self.context = context

    def fit(self, parameters: list[np.ndarray], config: Mapping) -> tuple[list[np.ndarray], int, Metrics]:
        cfg, out = settings(self.context.run_config)
        place = client_place(cfg, out, self.context, int(self.context.node_config["partition-id"]), virtual=False)
        cfg = with_client_overrides(fitted(cfg, int(config["planned_updates"])), place)
        round_, num_classes = int(config["round"]), int(config["num_classes"])
        info = {"num_classes": num_classes, "label_rate": int(config["label_rate"]), "local_head": False}
        task = local_task(cfg, info, self.context)
        model = task.model
        keys = list(model.state_dict())
        model.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, parameters, strict=True)})
        device = resolve_device(cfg.train.device)
        model.to(device)
        local = train_locally(model, task, cfg, place, round_, int(config["global_step"]), device)
        trained = [v.detach().cpu().numpy() for v in model.state_dict().values()]
        if self.context.run_config["keep-client-weights"]:
            place.work.mkdir(parents=True, exist_ok=True)
            np.savez(place.work / f"round_{round_:05d}.npz", **dict(zip(keys, trained, strict=True)))
        limit = float(config["clipping_range"])
        metrics = dict(local.metrics)
        metrics.update(
            client=place.index,
            train_time_s=local.seconds,
            out_of_range=sum(int((np.abs(a) > limit).sum()) for a in trained),
        )
        return trained, 1, metrics  # equal weights: the plain mean (see the module's docstring)


def secagg_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod`, unless the run config says `secagg = false` (the plain baseline)."""
    if context.run_config["secagg"]:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


clientapp = ClientApp(client_fn=lambda context: PretrainClient(context).to_client(), mods=[secagg_mod])


# ----------------------------------------------------------------------------------------------------- server
def content_bytes(message: Message) -> int:
    """The size of a message's content as Flower serializes it (protobuf), without its metadata."""
    return recorddict_to_proto(message.content).ByteSize()


class MeasuredGrid:
    """The ServerApp's grid, recording the bytes of every message sent and received and the stage it belongs to."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.exchanges: list[dict] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        first = messages[0]
        configs = first.content.config_records.get(STAGE_KEY)
        sent = [content_bytes(m) for m in messages]
        started = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.exchanges.append(
            {
                "round": int(first.metadata.group_id),
                "stage": str(configs["stage"]) if configs is not None else first.metadata.message_type,
                "seconds": time.perf_counter() - started,
                "to_clients": sent,
                "from_clients": [content_bytes(r) for r in replies if not r.has_error()],
                "errors": sum(r.has_error() for r in replies),
            }
        )
        return replies


class TimedFit:
    """A fit workflow that records each round's wall time and the clients' metrics."""

    def __init__(self, workflow: Callable[[Grid, Context], None]):
        self.workflow = workflow
        self.rounds: list[dict] = []

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        round_ = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        started = time.perf_counter()
        self.workflow(grid, context)
        seconds = time.perf_counter() - started
        metrics = {k: v[-1][1] for k, v in context.history.metrics_distributed_fit.items() if v[-1][0] == round_}
        self.rounds.append({"round": round_, "seconds": seconds, **metrics})
        log.info("round %d: %.1f s, %s", round_, seconds, json.dumps(metrics))
        if metrics.get("out_of_range", 0) > 0:
            log.warning("round %d: %d values outside +-clipping_range were clipped", round_, metrics["out_of_range"])


class Float32FedAvg(FedAvg):
    """FedAvg whose aggregate stays float32: SecAgg+ dequantizes to float64, which would double what the server
    sends."""

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:
            parameters = ndarrays_to_parameters([a.astype(np.float32) for a in parameters_to_ndarrays(parameters)])
        return parameters, metrics


def client_metrics(replies: list[tuple[int, Metrics]]) -> Metrics:
    """The round's mean training loss and time, and the values clipped by SecAgg+ (all clients)."""
    return {
        "train_loss": float(np.mean([m["train_loss"] for _, m in replies])),
        "train_time_s": float(np.mean([m["train_time_s"] for _, m in replies])),
        "out_of_range": int(sum(m["out_of_range"] for _, m in replies)),
        "clients": len(replies),
    }


def stage_bytes(exchanges: list[dict], round_: int) -> dict:
    """Mean bytes to and from one client in each stage of a round."""
    return {
        e["stage"]: {
            "to_client": float(np.mean(e["to_clients"])),
            "from_client": float(np.mean(e["from_clients"])) if e["from_clients"] else 0.0,
            "seconds": e["seconds"],
        }
        for e in exchanges
        if e["round"] == round_
    }


serverapp = ServerApp()


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    cfg, out = settings(run_config)
    setup_logging(out / "logs" / "secagg.log")
    partition, kmeans = read_inputs(cfg)
    check_supported(cfg, kmeans)
    num_clients, num_classes = int(partition["num_clients"]), int(kmeans["num_clusters"])
    rate = LabelRate(int(kmeans.get("label_rate", 100)), cfg.model)
    torch.manual_seed(cfg.seed)  # the initial model of `fedhubert pretrain` (and of each client's local_task)
    state = build_hubert(cfg.model, num_classes).state_dict()
    initial = [v.numpy() for v in state.values()]
    clipping_range = float(run_config["clipping-range"]) or 2 * max(float(np.abs(a).max()) for a in initial)
    secagg = bool(run_config["secagg"])
    sampled = cfg.strategy.sample_size(num_clients)
    steps = planned_local_steps(cfg, num_clients)  # the schedule and global step of `fedhubert pretrain`
    strategy = Float32FedAvg(
        fraction_fit=cfg.strategy.fraction,
        fraction_evaluate=0.0,
        min_fit_clients=sampled,
        min_available_clients=num_clients,
        initial_parameters=ndarrays_to_parameters(initial),
        on_fit_config_fn=lambda round_: {
            "round": round_,
            "global_step": (round_ - 1) * steps,
            "planned_updates": cfg.num_rounds * steps,
            "num_classes": num_classes,
            "label_rate": rate.rate,
            "clipping_range": clipping_range,
        },
        fit_metrics_aggregation_fn=client_metrics,
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.num_rounds), strategy=strategy)
    fit = TimedFit(
        SecAggPlusWorkflow(
            num_shares=int(run_config["num-shares"]),
            reconstruction_threshold=int(run_config["reconstruction-threshold"]),
            max_weight=1.0,
            clipping_range=clipping_range,
            quantization_range=QUANTIZATION_RANGE,
        )
        if secagg
        else default_fit_workflow
    )
    measured = MeasuredGrid(grid)
    log.info(
        "pretraining HuBERT %s (K=%d) with %d of %d clients per round, %d rounds of %d local steps, %s",
        cfg.model.preset,
        num_classes,
        sampled,
        num_clients,
        cfg.num_rounds,
        cfg.local_steps,
        f"SecAgg+ (clipping range {clipping_range:.4g})" if secagg else "no secure aggregation",
    )
    DefaultWorkflow(fit_workflow=fit)(measured, legacy)  # type: ignore[arg-type]

    record: ArrayRecord = legacy.state.array_records[MAIN_PARAMS_RECORD]
    final = parameters_to_ndarrays(arrayrecord_to_parameters(record, keep_input=True))
    save_checkpoint(
        out / "final.pt",
        kind="hubert",
        model=cfg.model,
        num_classes=num_classes,
        state_dict={k: torch.from_numpy(np.asarray(a)) for k, a in zip(state, final, strict=True)},
        label_rate=rate.rate,
        state={"stage": "pretrain-secagg", "round": cfg.num_rounds, "secagg": secagg},
    )
    summary = {
        "secagg": secagg,
        "clients": num_clients,
        "sampled": sampled,
        "num_shares": int(run_config["num-shares"]) if secagg else None,
        "reconstruction_threshold": int(run_config["reconstruction-threshold"]) if secagg else None,
        "clipping_range": clipping_range if secagg else None,
        "quantization_step": 2 * clipping_range / QUANTIZATION_RANGE if secagg else None,
        "parameters": int(sum(a.size for a in initial)),
        "rounds": [{**r, "stages": stage_bytes(measured.exchanges, r["round"])} for r in fit.rounds],
    }
    atomic_write_text(out / "secagg.json", json.dumps(summary, indent=2) + "\n")
    log.info("final model: %s; time and bytes per round: %s", out / "final.pt", out / "secagg.json")
