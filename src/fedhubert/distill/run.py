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
from fedhubert.fl.federation import check_stopped, run_training_task
from fedhubert.fl.local import ClientPlace, with_client_overrides
from fedhubert.fl.privacy import check_settings
from fedhubert.fl.resources import simulation_resources
from fedhubert.fl.round_log import plot_rounds, read_rows
from fedhubert.runlog import StageRun
from fedhubert.train.memory import estimate_activation_bytes

log = logging.getLogger(__name__)


def client_gpu_bytes(cfg: DistillConfig, teacher, teacher_cfg) -> int:
    """One client's GPU memory by estimate: the teacher's weights (inference only), the student's weights,
    gradients and AdamW moments, the student's activations for a batch of the longest crops (bounded by a
    full HuBERT of the student's depth; twice its transformer with the k-means term, whose masked pass runs the
    encoder again), and a CUDA context allowance."""
    layers = prediction_layers(cfg.student, teacher_cfg)
    student = build_student(distiller_config(cfg.student, teacher_cfg, layers, cfg.loss.cosine_weight), cfg.loss)
    crop = int(cfg.train.data.max_seconds * 16000)
    batch = max(1, int(cfg.train.data.batch_seconds * 16000) // crop)
    encoder_passes = 2 if cfg.loss.kmeans_weight > 0 else 1
    shape = dataclasses.replace(teacher_cfg, layers=cfg.student.layers * encoder_passes)
    activations = estimate_activation_bytes(
        shape,
        batch,
        crop,
        num_classes=0,
        precision=cfg.train.precision,
        checkpoint_layers=cfg.train.checkpoint_layers,
        checkpoint_cnn=cfg.train.checkpoint_cnn,
    )
    return (
        4 * sum(p.numel() for p in teacher.parameters())
        + 16 * sum(p.numel() for p in student.parameters())
        + activations
        + 768 * 2**20
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
    partition, kmeans = read_inputs(cfg)
    teacher, teacher_cfg, _ = load_teacher(cfg.teacher)  # a missing or wrong teacher stops here, before Flower
    prediction_layers(cfg.student, teacher_cfg)
    num_clients = int(partition["num_clients"])
    check_settings(cfg.privacy, num_clients, cfg.strategy.sample_size(num_clients))  # before Flower starts
    for client in range(num_clients):
        with_client_overrides(cfg, ClientPlace(client, Path(cfg.partition), None, out))
    resources = None
    if cfg.federation.superlink is None:
        resources = simulation_resources(cfg.federation, num_clients, client_gpu_bytes(cfg, teacher, teacher_cfg))
    summary = run_training_task(
        "distill", out, num_clients, cfg.federation, resources, resume=run.resume, force=run.force
    )
    plot_distill(cfg, out, summary)
    run.summary.update(summary)
    check_stopped("distill", summary, out)
    log.info(
        "distillation done: %d rounds, a student with %.1f%% of the teacher's parameters; final checkpoint %s",
        summary["rounds"],
        100 * summary["student_parameters"] / summary["teacher_parameters"],
        summary["final_checkpoint"],
    )
    return summary
