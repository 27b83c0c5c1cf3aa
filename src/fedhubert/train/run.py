"""`fedhubert train-local`: centralized HuBERT training on one or more manifests, the baseline that federated
runs compare with. Writes `checkpoints/` (step_<n>.pt, final.pt; loadable by `fedhubert export`),
`metrics.jsonl` (one line per log interval and evaluation) and `training.png`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from fedhubert.config import config_to_dict
from fedhubert.model.checkpoint import save_checkpoint
from fedhubert.model.config import PRESET_LR
from fedhubert.model.hubert import build_hubert, enable_checkpointing
from fedhubert.plots import plt, save_figure
from fedhubert.runlog import StageRun
from fedhubert.train.config import TrainConfig, TrainLocalConfig
from fedhubert.train.data import DataError, LabelRate, batch_loader, label_counts, load_utterances
from fedhubert.train.learning import learning_check, log_verdict
from fedhubert.train.loop import (
    MaskedPrediction,
    cycle_batches,
    evaluate,
    label_log_prior,
    make_optimizer,
    resolve_device,
    train,
)
from fedhubert.train.memory import batch_cap
from fedhubert.train.schedule import describe, fit_schedule, schedule_record, schedule_warnings

log = logging.getLogger(__name__)


def kmeans_records(labels: list[Path]) -> dict[Path, dict]:
    """The kmeans.json of the k-means runs that label files come from (<run>/client_<i>/<split>.km)."""
    records = {}
    for path in labels:
        record_path = Path(path).resolve().parent.parent / "kmeans.json"
        if record_path.is_file():
            records[record_path] = json.loads(record_path.read_text())
    return records


def label_rate_for(labels: list[Path]) -> int:
    rates = {record.get("label_rate", 100) for record in kmeans_records(labels).values()}
    if len(rates) > 1:
        raise DataError(f"the label files mix label rates {sorted(rates)} Hz")
    return rates.pop() if rates else 100


def num_classes_for(labels: list[Path], explicit: int | None) -> int:
    """K from the config, or from the kmeans.json of the k-means run the label files come from. Labels pooled
    from several clients must share one codebook (a per-client run's cluster ids mean different things)."""
    records = kmeans_records(labels)
    for record_path, record in records.items():
        pooled = {Path(p).resolve().parent for p in labels if Path(p).resolve().parent.parent == record_path.parent}
        if record["label_head"] == "local" and len(pooled) > 1:
            raise DataError(
                f"labels of {len(pooled)} clients of a per-client k-means run ({record_path.parent}) cannot "
                f"be pooled: each client's cluster ids mean something else. Use a federated k-means run"
            )
        if explicit is not None and explicit != record["num_clusters"]:
            raise DataError(f"num_classes={explicit} but {record_path} has K={record['num_clusters']}")
    if explicit is not None:
        return explicit
    ks = {record["num_clusters"] for record in records.values()}
    if len(ks) != 1:
        raise DataError("set num_classes: no kmeans.json (or several with different K) beside the label files")
    return ks.pop()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def data_loaders(cfg: TrainConfig, rate: LabelRate, train_pairs, valid_pairs, num_classes: int, seed: int):
    cap = batch_cap(cfg, rate.model, num_classes)
    train_utts = load_utterances(train_pairs, num_classes, cfg.data, rate)
    train_loader = batch_loader(train_utts, rate, cfg.data, seed, cap)
    valid_loader = None
    if valid_pairs:
        valid_loader = batch_loader(
            load_utterances(valid_pairs, num_classes, cfg.data, rate), rate, cfg.data, seed + 1, cap
        )
    return train_utts, train_loader, valid_loader


def plot_training(rows: list[dict], path: Path) -> None:
    """Loss and masked accuracy per update, and the validation gain over the label-frequency baseline."""
    fig, (ax_loss, ax_acc, ax_gain) = plt.subplots(1, 3, figsize=(16, 4))
    for kind, style in (("train", "-"), ("valid", "o-")):
        points = [r for r in rows if r["kind"] == kind]
        if points:
            ax_loss.plot([r["step"] for r in points], [r["loss"] for r in points], style, label=kind)
            ax_acc.plot([r["step"] for r in points], [r["acc_masked"] for r in points], style, label=kind)
    gains = [r for r in rows if r["kind"] == "valid" and "gain_nats" in r]
    ax_gain.plot([r["step"] for r in gains], [r["gain_nats"] for r in gains], "o-", color="tab:orange", label="valid")
    ax_gain.axhline(0.0, color="grey", linestyle="--", linewidth=1, label="frequency baseline")
    ax_loss.set(xlabel="update", ylabel="loss", title="masked prediction loss")
    ax_acc.set(xlabel="update", ylabel="accuracy", title="masked prediction accuracy")
    ax_gain.set(xlabel="update", ylabel="nats per masked frame", title="gain over the label-frequency baseline")
    if rows:
        ax_loss.legend()
        ax_acc.legend()
        ax_gain.legend()
    save_figure(fig, path)


def run_train_local(cfg: TrainLocalConfig, out: Path, run: StageRun) -> dict:
    num_classes = num_classes_for(cfg.train_labels, cfg.num_classes)
    schedule = schedule_record(cfg.train.optim, cfg.steps, PRESET_LR[cfg.model.preset])
    for problem in schedule_warnings(cfg.train.optim, cfg.steps):
        log.warning("%s", problem)
    log.info("%s", describe(schedule))
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train, optim=fit_schedule(cfg.train.optim, cfg.steps, PRESET_LR[cfg.model.preset])
        ),
    )
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)
    model = build_hubert(cfg.model, num_classes)
    enable_checkpointing(model, cfg.train.checkpoint_layers, cfg.train.checkpoint_cnn)
    model.to(device)
    rate = LabelRate(label_rate_for(cfg.train_labels), cfg.model)
    train_utts, train_loader, valid_loader = data_loaders(
        cfg.train,
        rate,
        list(zip(cfg.train_manifests, cfg.train_labels, strict=True)),
        list(zip(cfg.valid_manifests, cfg.valid_labels, strict=True)),
        num_classes,
        cfg.seed,
    )
    params = sum(p.numel() for p in model.parameters())
    log.info(
        "HuBERT %s (%.2f M parameters, K=%d) on %s: %d utterances (%.2f h), %d batches per epoch",
        cfg.model.preset,
        params / 1e6,
        num_classes,
        device,
        len(train_utts),
        sum(u.num_samples for u in train_utts) / 16000 / 3600,
        len(train_loader),
    )
    optimizer = make_optimizer(model, cfg.train.optim)
    objective = MaskedPrediction(
        cfg.loss, cfg.model.normalize_waveform, label_log_prior(label_counts(train_utts, num_classes))
    )
    metrics_path = out / "metrics.jsonl"
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        with open(metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def on_step(step: int, metrics: dict) -> None:
        record({"kind": "train", "step": step, **metrics})
        log.info(
            "update %d: loss %.3f, masked acc %.3f, %.0f audio s/s",
            step,
            metrics["loss"],
            metrics["acc_masked"],
            metrics["audio_seconds_per_second"],
        )

    def checkpoint(name: str, step: int) -> None:
        save_checkpoint(
            out / "checkpoints" / name,
            kind="hubert",
            model=cfg.model,
            num_classes=num_classes,
            state_dict=model.state_dict(),
            label_rate=rate.rate,
            state={"global_step": step, "stage": "train-local", "config": config_to_dict(cfg)},
        )

    first = evaluate(model, valid_loader, cfg.train, objective=objective, device=device) if valid_loader else None
    if first:
        record({"kind": "valid", "step": 0, **first})
    batches = cycle_batches(train_loader)
    step, last = 0, {}
    while step < cfg.steps:
        chunk = min(
            cfg.steps - step, cfg.eval_every - step % cfg.eval_every, cfg.checkpoint_every - step % cfg.checkpoint_every
        )
        result = train(
            model,
            batches,
            cfg.train,
            objective=objective,
            steps=chunk,
            global_step=step,
            optimizer=optimizer,
            device=device,
            on_step=on_step,
        )
        step, last = result.global_step, result.metrics
        if valid_loader and (step % cfg.eval_every == 0 or step == cfg.steps):
            valid = evaluate(model, valid_loader, cfg.train, objective=objective, device=device)
            record({"kind": "valid", "step": step, **valid})
            log.info(
                "update %d: validation masked cross-entropy %.3f, gain over the label-frequency baseline "
                "%+.3f nats, %d clusters predicted, masked acc %.3f",
                step,
                valid["ce_masked"],
                valid["gain_nats"],
                valid["predicted_clusters"],
                valid["acc_masked"],
            )
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            checkpoint(f"step_{step}.pt", step)
    checkpoint("final.pt", step)
    plot_training(rows, out / "training.png")
    valid_rows = [r for r in rows if r["kind"] == "valid"]
    summary = {
        "parameters": params,
        "num_classes": num_classes,
        "steps": step,
        "device": str(device),
        "schedule": schedule,
        "train": {k: last.get(k) for k in ("loss", "acc_masked", "audio_seconds_per_second", "peak_memory_mb")},
        "checkpoint": str(out / "checkpoints" / "final.pt"),
    }
    if valid_rows:
        keys = ("loss", "ce_masked", "baseline_ce_masked", "gain_nats", "predicted_clusters", "acc_masked")
        summary["valid_first"] = {k: valid_rows[0][k] for k in keys}
        summary["valid_last"] = {k: valid_rows[-1][k] for k in keys}
        summary["learning"] = learning_check([{"at": r["step"], **r} for r in valid_rows], "the validation set")
        log_verdict(summary["learning"], "train-local")
    run.summary.update(summary)
    return summary
