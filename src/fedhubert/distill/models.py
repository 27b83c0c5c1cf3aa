"""The distillation stage's frozen teacher, and its student (`fedhubert.model.student`) built from the stage's
config: the teacher layers it regresses and the S3PRL distiller config it is made from."""

from __future__ import annotations

from pathlib import Path

from torchaudio.models.wav2vec2.model import HuBERTPretrainModel

from fedhubert.distill.config import DistillLossConfig, StudentConfig
from fedhubert.errors import ConfigError
from fedhubert.model.checkpoint import load_checkpoint, model_config_of
from fedhubert.model.config import ModelConfig
from fedhubert.model.hubert import build_hubert
from fedhubert.model.student import Student


def load_teacher(path: Path) -> tuple[HuBERTPretrainModel, ModelConfig, dict]:
    """The teacher, frozen: eval mode, no gradients. A missing file, a corrupt one or one that is not a HuBERT
    checkpoint stops with a CheckpointError naming the file."""
    payload = load_checkpoint(path, kind="hubert")
    cfg = model_config_of(payload)
    model = build_hubert(cfg, payload["num_classes"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, cfg, payload


def prediction_layers(student: StudentConfig, teacher: ModelConfig) -> list[int]:
    """The teacher layers to regress: as configured, or a third, two thirds and all of its depth."""
    layers = student.pred_layers or sorted({max(1, round(teacher.layers * k / 3)) for k in (1, 2, 3)})
    too_deep = [layer for layer in layers if layer > teacher.layers]
    if too_deep:
        raise ConfigError(
            f"key 'student.pred_layers' asks for teacher layers {too_deep}, but the teacher has {teacher.layers}"
        )
    return list(layers)


def distiller_config(
    student: StudentConfig, teacher: ModelConfig, pred_layers: list[int], cosine_weight: float
) -> dict:
    """S3PRL DistillerConfig fields (saved as the exported checkpoint's Config['distiller'])."""
    width = student.embed_dim or teacher.embed_dim
    return {
        "extractor_mode": "default" if teacher.extractor_mode == "group_norm" else "layer_norm",
        "extractor_conv_feature_layers": repr([tuple(layer) for layer in teacher.conv_layers]),
        "extractor_dropout": 0.0,
        "feature_grad_mult": student.feature_grad_mult,
        "conv_pos": teacher.pos_conv_kernel,
        "conv_pos_groups": teacher.pos_conv_groups,
        "encoder_layers": student.layers,
        "encoder_embed_dim": width,
        "encoder_ffn_embed_dim": student.ffn_dim or teacher.ffn_dim,
        "encoder_attention_heads": student.heads or teacher.heads,
        "activation_fn": "gelu",
        "layer_norm_first": teacher.layer_norm_first,
        "attention_type": "original",
        "dropout": student.dropout,
        "attention_dropout": student.attention_dropout,
        "activation_dropout": student.activation_dropout,
        "encoder_layerdrop": 0.0,
        "final_dim": teacher.embed_dim,
        "out_layer_type": "expand-last",
        "out_layer_inter_dim": -1,
        "n_tasks": len(pred_layers),
        "task_emb_type": "expand-last",
        "task_emb_size": 0,
        "layer_emb_size": 0,
        "loss_type": "l1",
        "feat_pen_loss": 0.0,
        "cosine_loss": cosine_weight,
        "pred_layer_id": list(pred_layers),
        "init_teacher_conv_layers": student.init_from_teacher,
        "init_teacher_encoder_layers": student.init_from_teacher,
    }


def build_student(config: dict, loss: DistillLossConfig, num_classes: int = 0) -> Student:
    return Student(
        config, num_classes if loss.kmeans_weight > 0 else 0, loss.label_dim, loss.mask_prob, loss.mask_length
    )
