"""`fedhubert distill`: federated DistilHuBERT distillation from a frozen teacher, as a Flower run.

Writes what `fedhubert pretrain` writes (checkpoints of kind 'distiller', metrics.jsonl, tensorboard/,
messages.jsonl), plus `distill.json` and `distill.png`. `fedhubert export --format s3prl-distiller` turns a
checkpoint into what S3PRL's `distiller_local` upstream loads.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from fedhubert.distill.config import DistillConfig
from fedhubert.distill.models import build_student, distiller_config, load_teacher, prediction_layers
from fedhubert.distill.server import read_inputs
from fedhubert.fl.round_log import plot_rounds, read_rows
from fedhubert.fl.runtime.federation import run_training_stage
from fedhubert.fl.runtime.resources import estimate_client_gpu_bytes
from fedhubert.runlog import StageRun

log = logging.getLogger(__name__)


def client_gpu_bytes(cfg: DistillConfig, teacher, teacher_cfg) -> int:
    """One client's GPU memory by estimate: the teacher's weights (inference only), and the student it trains,
    whose activations are bounded by a full HuBERT of the student's depth (twice its transformer with the k-means
    term, whose masked pass runs the encoder again)."""
    layers = prediction_layers(cfg.student, teacher_cfg)
    student = build_student(distiller_config(cfg.student, teacher_cfg, layers, cfg.loss.cosine_weight), cfg.loss)
    encoder_passes = 2 if cfg.loss.kmeans_weight > 0 else 1
    return estimate_client_gpu_bytes(
        cfg.train,
        dataclasses.replace(teacher_cfg, layers=cfg.student.layers * encoder_passes),
        trained=sum(p.numel() for p in student.parameters()),
        frozen=sum(p.numel() for p in teacher.parameters()),
    )


def plot_distill(cfg: DistillConfig, out: Path, summary: dict) -> None:
    """distill.png from the run's metrics.jsonl."""
    plot_rounds(
        read_rows(out / "metrics.jsonl"),
        out / "distill.png",
        f"federated distillation ({cfg.strategy.name}, {summary['clients']} clients)",
        acc_key="train_acc_masked" if cfg.loss.kmeans_weight > 0 else None,
    )


def run_distill(cfg: DistillConfig, out: Path, run: StageRun) -> dict:
    out = Path(out).resolve()
    partition, _ = read_inputs(cfg)
    teacher, teacher_cfg, _ = load_teacher(cfg.teacher)  # a missing or wrong teacher stops here, before Flower
    prediction_layers(cfg.student, teacher_cfg)
    summary = run_training_stage(
        "distill",
        cfg,
        out,
        run,
        num_clients=int(partition["num_clients"]),
        checkpoint_kind="distiller",
        gpu_bytes=lambda: client_gpu_bytes(cfg, teacher, teacher_cfg),
        plot=lambda summary: plot_distill(cfg, out, summary),
    )
    log.info(
        "distillation done: %d rounds, a student with %.1f%% of the teacher's parameters; final checkpoint %s",
        summary["rounds"],
        100 * summary["student_parameters"] / summary["teacher_parameters"],
        summary["final_checkpoint"],
    )
    return summary
