"""The local train and evaluate functions every client runs (and `fedhubert train-local`).

The objective of a batch is pluggable (`Objective`): HuBERT's masked prediction here (`MaskedPrediction`), and
DistilHuBERT's layer regression in `fedhubert.distill`. Masked prediction (the recipe): cross-entropy of the masked
frames' logits against index 0, where torchaudio puts the positive (the frame's own k-means label); the label ids
themselves are never the targets. Plus unmasked frames (weight 0 by default) and the CNN feature penalty, all
normalised by the number of masked frames. Its metrics cannot be satisfied by counting label frequencies: beside
accuracy they report the masked cross-entropy, the cross-entropy of the label-frequency baseline (always predicting
the training label distribution) on the same frames, the gain over it in nats, the accuracy of always predicting
the most frequent training cluster on those frames, and how many distinct clusters the model predicts. AdamW,
linear warm-up then linear decay by a global step that the caller keeps across rounds, gradient accumulation,
clipping, and bf16 or fp16 autocast over fp32 weights. A call in which no batch is trained raises, rather than
report a model that did not change as trained.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torchaudio.models.wav2vec2.model import HuBERTPretrainModel

from fedhubert.errors import FedhubertError
from fedhubert.model.hubert import normalize_waveforms
from fedhubert.train.config import LossConfig, OptimConfig, TrainConfig
from fedhubert.train.data import Batch

log = logging.getLogger(__name__)


class TrainingError(FedhubertError):
    """Training did not happen or diverged."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device '{name}' was asked for but no CUDA GPU is available; use device=cpu or auto")
    return device


def learning_rate(step: int, optim: OptimConfig) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then linear decay to 0 at `total_steps` (both resolved: see
    `fedhubert.train.schedule`)."""
    if optim.lr is None or optim.warmup_steps is None or optim.total_steps is None:
        raise TrainingError(
            "the learning-rate schedule is not resolved: call fedhubert.train.schedule.fit_schedule "
            "with the run's planned updates first"
        )
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    remaining = (optim.total_steps - step) / max(1, optim.total_steps - optim.warmup_steps)
    return optim.lr * max(0.0, remaining)


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum (`optim.name`); its learning rate is set before every update by `train`
    (`learning_rate`)."""
    if optim.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=optim.lr or 0.0, momentum=optim.momentum, weight_decay=optim.weight_decay
        )
    return torch.optim.AdamW(
        model.parameters(), lr=optim.lr or 0.0, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay
    )


@dataclass
class StepOutput:
    loss: torch.Tensor  # this batch's loss, normalised, ready for backward
    sums: dict  # additive statistics (frames, correct predictions, histograms as arrays, ...) for the metrics


class Objective(Protocol):
    """What a batch trains: the forward pass and loss of a task, and how its statistics become metrics."""

    def step(self, model: torch.nn.Module, batch: Batch, device: torch.device, precision: str) -> StepOutput: ...

    def metrics(self, sums: dict[str, float]) -> dict[str, float]: ...


def label_scores(logit_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each frame's label id and its K class scores, recovered from torchaudio's logit layout [positive, all K
    classes with the positive's own class at -inf]: the label is the -inf column, whose score is the positive's."""
    negatives = logit_m[:, 1:].float()
    own = torch.isneginf(negatives)
    return own.float().argmax(dim=1), torch.where(own, logit_m[:, :1].float(), negatives)


def label_log_prior(counts: np.ndarray) -> torch.Tensor:
    """Log-probabilities of the label-frequency baseline: the training label distribution, add-one smoothed so that
    a cluster unseen in training costs log(N + K) rather than infinity."""
    counts = np.asarray(counts, dtype=np.float64)
    return torch.from_numpy(np.log((counts + 1.0) / (counts.sum() + len(counts)))).float()


def hubert_loss(
    logit_m: torch.Tensor,
    logit_u: torch.Tensor,
    feature_penalty: torch.Tensor,
    weights: LossConfig,
    log_prior: torch.Tensor | None = None,
) -> StepOutput:
    """Masked prediction loss; the positive is at index 0 of every row of logits. Its statistics include the
    masked cross-entropy, the baseline's cross-entropy and correct predictions (with `log_prior`) and the histogram
    of predicted clusters."""
    masked = logit_m.shape[0]
    target_m = torch.zeros(masked, dtype=torch.long, device=logit_m.device)
    target_u = torch.zeros(logit_u.shape[0], dtype=torch.long, device=logit_u.device)
    ce_m = F.cross_entropy(logit_m.float(), target_m, reduction="sum")
    total = weights.masked_weight * ce_m
    if weights.unmasked_weight > 0 and len(target_u):
        total = total + weights.unmasked_weight * F.cross_entropy(logit_u.float(), target_u, reduction="sum")
    total = total + weights.feature_penalty * feature_penalty.float() * masked
    sums: dict = {"masked": masked, "unmasked": logit_u.shape[0], "ce_m": float(ce_m.detach())}
    with torch.no_grad():
        sums["correct_m"] = int((logit_m.argmax(dim=-1) == 0).sum()) if masked else 0
        sums["correct_u"] = int((logit_u.argmax(dim=-1) == 0).sum()) if len(target_u) else 0
        if masked:
            labels, scores = label_scores(logit_m)
            sums["predicted"] = np.bincount(scores.argmax(dim=1).cpu().numpy(), minlength=scores.shape[1])
            if log_prior is not None:
                prior = log_prior.to(labels.device)
                sums["prior_ce_m"] = float(-prior[labels].sum())
                sums["prior_correct_m"] = int((labels == prior.argmax()).sum())
    return StepOutput(total / max(masked, 1), sums)


def prediction_metrics(sums: dict) -> dict[str, float]:
    """Masked cross-entropy, the frequency baseline's and the gain over it (nats), the baseline's masked accuracy
    (always the most frequent training cluster), distinct predicted clusters and the entropy of the predictions
    (nats): what tells a model that learned from one that counts frequencies."""
    masked = max(sums.get("masked", 0), 1)
    out = {"ce_masked": sums.get("ce_m", 0.0) / masked}
    if "prior_ce_m" in sums:
        out["baseline_ce_masked"] = sums["prior_ce_m"] / masked
        out["gain_nats"] = out["baseline_ce_masked"] - out["ce_masked"]
        out["baseline_acc_masked"] = sums["prior_correct_m"] / masked
    predicted = np.asarray(sums.get("predicted", []), dtype=np.float64)
    if predicted.sum() > 0:
        share = predicted[predicted > 0] / predicted.sum()
        out["predicted_clusters"] = int((predicted > 0).sum())
        out["prediction_entropy"] = float(-(share * np.log(share)).sum())
    return out


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


@dataclass
class MaskedPrediction:
    """HuBERT pretraining: masked prediction of k-means labels."""

    weights: LossConfig
    normalize: bool = False  # zero-mean unit-variance waveforms (HuBERT Large)
    log_prior: torch.Tensor | None = None  # the label-frequency baseline (`label_log_prior` of training labels)

    def step(self, model: HuBERTPretrainModel, batch: Batch, device: torch.device, precision: str) -> StepOutput:
        waveforms = batch.waveforms.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        if self.normalize:
            waveforms = normalize_waveforms(waveforms, None)
        with autocast(device, precision):
            logit_m, logit_u, penalty = model(waveforms, labels)
        return hubert_loss(logit_m, logit_u, penalty, self.weights, self.log_prior)

    def metrics(self, sums: dict) -> dict[str, float]:
        return {
            "acc_masked": sums.get("correct_m", 0) / max(sums.get("masked", 0), 1),
            "acc_unmasked": sums.get("correct_u", 0) / max(sums.get("unmasked", 0), 1),
            **prediction_metrics(sums),
        }


@dataclass
class Meter:
    """Sums over the batches of a call; `summary` turns them into the reported metrics."""

    loss_sum: float = 0.0
    batches: int = 0
    seconds: float = 0.0
    skipped: int = 0
    sums: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, out: StepOutput, seconds: float) -> None:
        self.loss_sum += float(out.loss.detach())
        self.batches += 1
        self.seconds += seconds
        for key, value in out.sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def summary(self, device: torch.device, objective: Objective) -> dict:
        elapsed = time.perf_counter() - self.started
        return {
            "loss": self.loss_sum / max(self.batches, 1),
            **objective.metrics(self.sums),
            "batches": self.batches,
            "skipped_batches": self.skipped,
            "audio_seconds": self.seconds,
            "audio_seconds_per_second": self.seconds / elapsed if elapsed > 0 else 0.0,
            "peak_memory_mb": peak_memory_mb(device),
        }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class TrainResult:
    metrics: dict
    global_step: int


def cycle_batches(loader: Iterable[Batch], first_epoch: int = 0) -> Iterator[Batch]:
    """Batches of `loader` epoch after epoch (a new order each epoch); ends at once if the loader is empty."""
    epoch = first_epoch
    while True:
        sampler = getattr(loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return
        epoch += 1


def train(
    model: torch.nn.Module,
    batches: Iterator[Batch],
    cfg: TrainConfig,
    *,
    objective: Objective,
    steps: int,
    global_step: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    on_step=None,
) -> TrainResult:
    """Run `steps` optimizer updates (each over `accumulation_steps` batches) taken from `batches` (see
    `cycle_batches`; the iterator carries on where it stopped, so successive calls see new batches).

    `global_step` drives the learning rate and is returned advanced; `on_step(global_step, metrics)` is called
    every `log_every` updates.
    """
    model.train()
    if scaler is None and cfg.precision == "fp16":
        scaler = torch.amp.GradScaler(device.type)
    meter, window = Meter(), Meter()
    done = 0
    if learning_rate(global_step, cfg.optim) == 0.0:
        log.warning(
            "the learning rate is 0 from global step %d on (optim.total_steps=%d): these %d updates change nothing",
            global_step,
            cfg.optim.total_steps,
            steps,
        )
    for _ in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(global_step, cfg.optim)
        optimizer.zero_grad(set_to_none=True)
        accumulated = 0
        for batch in batches:
            out = objective.step(model, batch, device, cfg.precision)
            if not torch.isfinite(out.loss):
                meter.skipped += 1
                log.warning("non-finite loss on a batch of %.1f s; batch skipped", batch.seconds)
                continue
            loss = out.loss / cfg.accumulation_steps
            (scaler.scale(loss) if scaler else loss).backward()
            meter.add(out, batch.seconds)
            window.add(out, batch.seconds)
            accumulated += 1
            if accumulated == cfg.accumulation_steps:
                break
        if accumulated == 0:
            break
        if scaler:
            scaler.unscale_(optimizer)
        if cfg.optim.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        global_step += 1
        done += 1
        if on_step is not None and global_step % cfg.log_every == 0:
            on_step(global_step, {**window.summary(device, objective), "lr": learning_rate(global_step - 1, cfg.optim)})
            window = Meter()
    if done == 0:
        raise TrainingError(
            "no batch was trained: the data yielded no usable batch (all skipped or empty); the model is unchanged"
        )
    metrics = {
        **meter.summary(device, objective),
        "steps": done,
        "global_step": global_step,
        "lr": learning_rate(global_step - 1, cfg.optim),
    }
    if not math.isfinite(metrics["loss"]):
        raise TrainingError(f"training diverged: mean loss {metrics['loss']}")
    return TrainResult(metrics, global_step)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[Batch],
    cfg: TrainConfig,
    *,
    objective: Objective,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """The objective's loss and metrics without dropout; masks come from a fixed seed so that evaluations of
    different models see the same masks."""
    model.eval()
    meter = Meter()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        sampler = getattr(loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(0)
        for batch in loader:
            meter.add(objective.step(model, batch, device, cfg.precision), batch.seconds)
    if meter.batches == 0:
        raise TrainingError("no batch to evaluate on: the validation data is empty")
    model.train()
    return meter.summary(device, objective)
