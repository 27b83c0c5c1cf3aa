"""The server side of federated distillation: the initial student (from the teacher), what is shared, and the
server-side evaluation (the distillation loss on the held-out set: the teacher gives the targets, so no labels
are needed)."""

from __future__ import annotations

import dataclasses
import logging

import torch
from flwr.serverapp import Grid

from fedhubert.config import load_config
from fedhubert.distill.config import DISTILL_LR_SHARE, DistillConfig
from fedhubert.distill.models import build_student, distiller_config, load_teacher, prediction_layers
from fedhubert.distill.objective import Distillation
from fedhubert.fl.local import planned_local_steps
from fedhubert.fl.rounds import RoundTask
from fedhubert.fl.tasks import ServerRun
from fedhubert.fl.training import (
    client_seconds,
    held_out_evaluator,
    label_heads,
    read_task_inputs,
    serve_rounds,
    unlabelled_clients,
)
from fedhubert.manifest import file_sha256
from fedhubert.model.config import PRESET_LR
from fedhubert.model.student import LABEL_HEAD_KEYS, init_from_teacher
from fedhubert.train.data import LabelRate

log = logging.getLogger(__name__)


def read_inputs(cfg: DistillConfig) -> tuple[dict, dict | None]:
    """partition.json, and kmeans.json when the k-means term is on (checked to label that partition)."""
    return read_task_inputs(cfg, ("teacher", "partition", "kmeans"), with_kmeans=cfg.loss.kmeans_weight > 0)


def student_description(cfg: DistillConfig, teacher_cfg, layers: list[int]) -> dict:
    """What a distiller checkpoint records as its model: S3PRL's distiller config and where the student came from."""
    return {
        "distiller": distiller_config(cfg.student, teacher_cfg, layers, cfg.loss.cosine_weight),
        "teacher": {"path": str(cfg.teacher), "sha256": file_sha256(cfg.teacher)},
        "label_dim": cfg.loss.label_dim,
        "mask_prob": cfg.loss.mask_prob,
        "mask_length": cfg.loss.mask_length,
    }


def serve_distill(grid: Grid, run: ServerRun) -> dict:
    cfg, out = load_config(DistillConfig, run.config), run.out
    partition, kmeans = read_inputs(cfg)
    num_clients = int(partition["num_clients"])
    teacher, teacher_cfg, _ = load_teacher(cfg.teacher)
    layers = prediction_layers(cfg.student, teacher_cfg)
    num_classes = int(kmeans["num_clusters"]) if kmeans else 0
    local_head = bool(kmeans) and kmeans["label_head"] == "local"
    rate = LabelRate(int(kmeans.get("label_rate", 100)) if kmeans else 100, teacher_cfg)
    description = student_description(cfg, teacher_cfg, layers)
    torch.manual_seed(cfg.seed)
    student = build_student(description["distiller"], cfg.loss, num_classes)
    if cfg.student.init_from_teacher:
        copied = init_from_teacher(student, teacher.state_dict())
        log.info(
            "student initialised from the teacher: %d tensors (CNN, projection, positional conv, %d layers)",
            len(copied),
            cfg.student.layers,
        )
    state = {k: v.clone() for k, v in student.state_dict().items()}
    shared = [k for k in state if not (local_head and k in LABEL_HEAD_KEYS)]
    teacher_params = sum(p.numel() for p in teacher.parameters())
    student_params = sum(v.numel() for k, v in state.items() if k.startswith("distiller."))
    log.info(
        "distilling %d teacher layers %s into a %d-layer student (%.1f%% of the teacher's %d parameters), %d "
        "clients, %s",
        teacher_cfg.layers,
        layers,
        cfg.student.layers,
        100 * student_params / teacher_params,
        teacher_params,
        num_clients,
        cfg.strategy.name,
    )
    evaluation = Distillation(teacher, teacher_cfg, layers, dataclasses.replace(cfg.loss, kmeans_weight=0.0))

    heads = label_heads(kmeans["label_head"] if kmeans else "none", out, num_clients)
    task = RoundTask(
        name="distill",
        message_type="train.distill",
        checkpoint_kind="distiller",
        model_config=description,
        num_classes=num_classes,
        state=state,
        shared_keys=shared,
        round_info={"num_classes": num_classes, "label_rate": rate.rate, "local_head": local_head},
        evaluate=held_out_evaluator(cfg, student, evaluation, LabelRate(100, teacher_cfg), frozen=(teacher,)),
        best_key="loss",
        higher_is_better=False,
        local_steps=planned_local_steps(cfg, num_clients),
        default_lr=DISTILL_LR_SHARE * PRESET_LR[teacher_cfg.preset],
        checkpoint_extra=lambda round_: {"pred_layers": layers, **heads(round_)},
        client_seconds=client_seconds(partition),
        unavailable=unlabelled_clients(kmeans),
    )
    details = {"teacher_parameters": teacher_params, "student_parameters": student_params, "pred_layers": layers}
    return serve_rounds(grid, run, cfg, task, num_clients, details)
