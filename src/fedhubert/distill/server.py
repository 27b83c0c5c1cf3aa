"""The server side of federated distillation: the initial student (from the teacher), what is shared, and the
server-side evaluation (the distillation loss on the held-out set: the teacher gives the targets, so no labels
are needed)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from flwr.serverapp import Grid

from fedhubert.atomic import atomic_write_text
from fedhubert.config import load_config
from fedhubert.distill.config import DISTILL_LR_SHARE, DistillConfig
from fedhubert.distill.models import build_student, distiller_config, load_teacher, prediction_layers
from fedhubert.distill.objective import Distillation
from fedhubert.errors import ConfigError
from fedhubert.fl.local import client_heads, planned_local_steps
from fedhubert.fl.rounds import FederatedRun, RoundTask, summary_path
from fedhubert.fl.tasks import ServerRun
from fedhubert.manifest import file_sha256
from fedhubert.model.config import PRESET_LR
from fedhubert.model.student import LABEL_HEAD_KEYS, init_from_teacher
from fedhubert.train.data import LabelRate, batch_loader, load_utterances
from fedhubert.train.loop import evaluate, resolve_device
from fedhubert.train.memory import batch_cap

log = logging.getLogger(__name__)


def read_inputs(cfg: DistillConfig) -> tuple[dict, dict | None]:
    """partition.json, and kmeans.json when the k-means term is on (checked to label that partition)."""
    for key in ("teacher", "partition", "kmeans"):
        value = getattr(cfg, key)
        if value is not None and not Path(value).is_absolute():
            raise ConfigError(f"key '{key}' must be an absolute path when the ServerApp reads it ({value})")
    partition_file = Path(cfg.partition) / "partition.json"
    if not partition_file.is_file():
        raise ConfigError(
            f"{partition_file} not found: '{cfg.partition}' is not a folder made by 'fedhubert partition'"
        )
    partition = json.loads(partition_file.read_text())
    if cfg.loss.kmeans_weight == 0:
        return partition, None
    kmeans_file = Path(cfg.kmeans) / "kmeans.json"
    if not kmeans_file.is_file():
        raise ConfigError(f"{kmeans_file} not found: '{cfg.kmeans}' is not a folder made by 'fedhubert kmeans'")
    kmeans = json.loads(kmeans_file.read_text())
    if Path(kmeans["partition"]["path"]).resolve() != Path(cfg.partition).resolve():
        raise ConfigError(
            f"{kmeans_file} labels the partition {kmeans['partition']['path']}, not {cfg.partition}: make labels "
            f"for this one with 'fedhubert kmeans --partition {cfg.partition} --out DIR', then pass --kmeans DIR"
        )
    return partition, kmeans


def student_description(cfg: DistillConfig, teacher_cfg, layers: list[int]) -> dict:
    """What a distiller checkpoint records as its model: S3PRL's distiller config and where the student came from."""
    return {
        "distiller": distiller_config(cfg.student, teacher_cfg, layers, cfg.loss.cosine_weight),
        "teacher": {"path": str(cfg.teacher), "sha256": file_sha256(cfg.teacher)},
        "label_dim": cfg.loss.label_dim,
        "mask_prob": cfg.loss.mask_prob,
        "mask_length": cfg.loss.mask_length,
    }


def dev_evaluator(cfg: DistillConfig, objective: Distillation, rate: LabelRate, student):
    manifest = Path(cfg.partition) / "global" / f"{cfg.eval_subset}.tsv"
    if not manifest.is_file():
        log.warning("no %s: no server-side evaluation", manifest)
        return None
    utts = load_utterances([(manifest, None)], 0, cfg.train.data, rate)
    loader = batch_loader(utts, rate, cfg.train.data, cfg.seed, batch_cap(cfg.train, rate.model, 0))
    device = resolve_device(cfg.train.device)
    objective.teacher.to(device)
    student.to(device)

    def run(state: dict[str, torch.Tensor]) -> dict:
        student.load_state_dict(state)
        return evaluate(student, loader, cfg.train, objective=objective, device=device, seed=cfg.seed)

    return run


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

    def heads(round_: int) -> dict:
        if not local_head:
            return {"label_head": "shared" if num_classes else "none"}
        return {"label_head": "local", "client_heads": client_heads(out, num_clients, round_)}

    task = RoundTask(
        name="distill",
        message_type="train.distill",
        checkpoint_kind="distiller",
        model_config=description,
        num_classes=num_classes,
        state=state,
        shared_keys=shared,
        round_info={"num_classes": num_classes, "label_rate": rate.rate, "local_head": local_head},
        evaluate=dev_evaluator(cfg, evaluation, LabelRate(100, teacher_cfg), student),
        best_key="loss",
        higher_is_better=False,
        local_steps=planned_local_steps(cfg, num_clients),
        default_lr=DISTILL_LR_SHARE * PRESET_LR[teacher_cfg.preset],
        checkpoint_extra=lambda round_: {"pred_layers": layers, **heads(round_)},
    )
    summary = FederatedRun(grid, cfg, out, task, num_clients, resume=run.resume, threads=run.threads).run()
    summary.update(
        {
            "teacher_parameters": teacher_params,
            "student_parameters": student_params,
            "pred_layers": layers,
            "clients": num_clients,
        }
    )
    atomic_write_text(summary_path(out, "distill"), json.dumps(summary, indent=2) + "\n")
    return summary
