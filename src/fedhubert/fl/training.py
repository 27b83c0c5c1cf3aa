"""What the ServerApps of the federated training tasks (pretraining, distillation) share around the round loop:
reading their inputs, the server-side evaluation on the partition's held-out set, what a checkpoint records of
the label heads, and running the rounds to the summary that the stage's command reads back."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from flwr.serverapp import Grid

from fedhubert.atomic import atomic_write_text
from fedhubert.errors import ConfigError
from fedhubert.fl.config import RoundsConfig
from fedhubert.fl.held_out import HeldOutEvaluation, describe, stratified_sample
from fedhubert.fl.local import client_heads
from fedhubert.fl.rounds import FederatedRun, RoundTask, summary_path
from fedhubert.fl.tasks import ServerRun
from fedhubert.train.data import LabelRate, batch_loader, load_utterances
from fedhubert.train.loop import Objective, resolve_device
from fedhubert.train.memory import batch_cap

log = logging.getLogger(__name__)


def read_task_inputs(cfg: RoundsConfig, path_keys: Sequence[str], with_kmeans: bool) -> tuple[dict, dict | None]:
    """partition.json, and with `with_kmeans` the kmeans.json of the config's `kmeans` folder, checked to label
    that partition. The config's `path_keys` that are set must be absolute: the ServerApp may run elsewhere."""
    for key in path_keys:
        value = getattr(cfg, key)
        if value is not None and not Path(value).is_absolute():
            raise ConfigError(f"key '{key}' must be an absolute path when the ServerApp reads it ({value})")
    files = [(Path(cfg.partition) / "partition.json", "partition")]
    if with_kmeans:
        files.append((Path(cfg.kmeans) / "kmeans.json", "kmeans"))
    for path, stage in files:
        if not path.is_file():
            raise ConfigError(f"{path} not found: '{path.parent}' is not a folder made by 'fedhubert {stage}'")
    partition = json.loads(files[0][0].read_text())
    if not with_kmeans:
        return partition, None
    kmeans_file = files[1][0]
    kmeans = json.loads(kmeans_file.read_text())
    if Path(kmeans["partition"]["path"]).resolve() != Path(cfg.partition).resolve():
        raise ConfigError(
            f"{kmeans_file} labels the partition {kmeans['partition']['path']}, not {cfg.partition}: make labels "
            f"for this one with 'fedhubert kmeans --partition {cfg.partition} --out DIR', then pass --kmeans DIR"
        )
    return partition, kmeans


def unlabelled_clients(kmeans: dict | None) -> dict[int, str]:
    """The clients k-means left without labels (kmeans.json's failed_clients), with why: training never samples
    them."""
    if kmeans is None:
        return {}
    return {
        int(failed["client"]): f"no k-means labels (it failed in {failed['stage']}: {failed['reason']})"
        for failed in kmeans.get("failed_clients", [])
    }


def client_seconds(partition: dict) -> list[float]:
    """Each client's audio in seconds (training and validation splits), by partition id, from partition.json."""
    return [
        3600.0 * (float(c["hours"]["train"]) + float(c["hours"]["valid"]))
        for c in sorted(partition["clients"], key=lambda c: int(c["client"]))
    ]


def held_out_evaluator(
    cfg: RoundsConfig,
    model: torch.nn.Module,
    objective: Objective,
    rate: LabelRate,
    *,
    labels: Path | None = None,
    num_classes: int = 0,
    frozen: Sequence[torch.nn.Module] = (),
) -> HeldOutEvaluation | None:
    """Server-side evaluation of a global state on at most `eval_seconds` of the partition's `eval_subset` (a
    seeded, speaker-stratified sample; with `labels`, its k-means labels of `num_classes` clusters), on the trainer's
    device, where the objective's `frozen` modules (a teacher) go too. None, with a warning, when the held-out files
    are missing."""
    manifest = Path(cfg.partition) / "global" / f"{cfg.eval_subset}.tsv"
    missing = [str(path) for path in (manifest, labels) if path is not None and not path.is_file()]
    if missing:
        log.warning("no %s: no server-side evaluation", " / ".join(missing))
        return None
    whole = load_utterances([(manifest, labels)], num_classes, cfg.train.data, rate)
    utts = stratified_sample(whole, cfg.eval_seconds, cfg.seed)
    sample = describe(utts, whole, cfg.eval_subset, cfg.eval_seconds, cfg.seed)
    log.info(
        "server evaluation on %s s of %s (%d utterances of %d speakers; of %s s, %d speakers; eval_seconds=%s)",
        sample["seconds"],
        cfg.eval_subset,
        sample["utterances"],
        sample["speakers"],
        sample["of_seconds"],
        sample["of_speakers"],
        cfg.eval_seconds,
    )
    # Batches of at most one longest utterance: a batch is cropped to its shortest utterance, and the training
    # batch (87.5 s at Base) cropped a 200 s sample to 63 s of audio evaluated; one-utterance batches cover it all
    # and ran faster on CPU (6.9 against 5.4 audio s/s at Base, benchmarks/eval_cost.py).
    data = dataclasses.replace(
        cfg.train.data, batch_seconds=min(cfg.train.data.batch_seconds, cfg.train.data.max_seconds)
    )
    loader = batch_loader(utts, rate, data, cfg.seed, batch_cap(cfg.train, rate.model, num_classes))
    device = resolve_device(cfg.train.device)
    for module in (*frozen, model):
        module.to(device)
    return HeldOutEvaluation(model, loader, cfg.train, objective, device, cfg.seed, sample)


def label_heads(label_head: str, out: Path, num_clients: int) -> Callable[[int], dict]:
    """What a checkpoint of a round records of the label head: `label_head` (shared, local or none), and with local
    heads each client's newest head file up to that round (the heads never leave the clients' folders)."""

    def record(round_: int) -> dict:
        if label_head != "local":
            return {"label_head": label_head}
        return {"label_head": "local", "client_heads": client_heads(out, num_clients, round_)}

    return record


def serve_rounds(
    grid: Grid, run: ServerRun, cfg: RoundsConfig, task: RoundTask, num_clients: int, details: dict
) -> dict:
    """The task's rounds; their summary, with the stage's `details` and the number of clients, is written where the
    stage's command reads it back."""
    summary = FederatedRun(grid, cfg, run.out, task, num_clients, resume=run.resume, threads=run.threads).run()
    summary.update({**details, "clients": num_clients})
    atomic_write_text(summary_path(run.out, task.name), json.dumps(summary, indent=2) + "\n")
    return summary
