"""The client side of federated distillation: the frozen teacher computes targets on the client's own audio and
the student learns them for one round (the round itself is `fedhubert.fl.local.local_round`).

The teacher checkpoint is read from the run's `teacher` path, or from the node config's `teacher-checkpoint`
on a deployment; a client process loads it once and again only when the file changes."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from flwr.app import Context, Message
from torchaudio.models.wav2vec2.model import HuBERTPretrainModel

from fedhubert.distill.config import DistillConfig
from fedhubert.distill.models import build_student, distiller_config, load_teacher, prediction_layers
from fedhubert.distill.objective import Distillation
from fedhubert.fl.local import LocalTask, local_round
from fedhubert.model.config import ModelConfig
from fedhubert.model.student import LABEL_HEAD_KEYS, init_from_teacher
from fedhubert.train.data import LabelRate
from fedhubert.train.loop import resolve_device


def teacher(path: Path) -> tuple[HuBERTPretrainModel, ModelConfig]:
    """The teacher model and its config, kept in the client process while the checkpoint file is unchanged."""
    stat = path.stat()
    return _teacher(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _teacher(path: str, mtime_ns: int, size: int) -> tuple[HuBERTPretrainModel, ModelConfig]:
    return load_teacher(Path(path))[:2]


def local_task(cfg: DistillConfig, info, context: Context) -> LocalTask:
    path = Path(str(context.node_config.get("teacher-checkpoint", cfg.teacher)))
    model, teacher_cfg = teacher(path)
    model.to(resolve_device(cfg.train.device))
    layers = prediction_layers(cfg.student, teacher_cfg)
    num_classes = int(info["num_classes"])
    torch.manual_seed(cfg.seed)  # the server's initial student (and label head)
    student = build_student(
        distiller_config(cfg.student, teacher_cfg, layers, cfg.loss.cosine_weight), cfg.loss, num_classes
    )
    if cfg.student.init_from_teacher:
        init_from_teacher(student, model.state_dict())
    student.enable_checkpointing(cfg.train.checkpoint_layers, cfg.train.checkpoint_cnn)
    return LocalTask(
        model=student,
        objective=Distillation(model, teacher_cfg, layers, cfg.loss),
        head_keys=LABEL_HEAD_KEYS if bool(info["local_head"]) and num_classes else (),
        num_classes=num_classes,
        rate=LabelRate(int(info["label_rate"]), teacher_cfg),
        with_labels=num_classes > 0,
    )


def train_round(message: Message, context: Context) -> Message:
    return local_round(message, context, DistillConfig, local_task)
