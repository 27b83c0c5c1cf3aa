"""The client side of federated pretraining: a HuBERT trained by masked prediction of the client's k-means labels
for one round (the round itself is `fedhubert.fl.local.local_round`)."""

from __future__ import annotations

import torch
from flwr.app import Context, Message

from fedhubert.fl.local import LocalTask, local_round
from fedhubert.model.hubert import LABEL_HEAD_KEYS, build_hubert, enable_checkpointing
from fedhubert.pretrain.config import PretrainConfig
from fedhubert.train.data import LabelRate
from fedhubert.train.loop import MaskedPrediction


def local_task(cfg: PretrainConfig, info, context: Context) -> LocalTask:
    """A client's pretraining task for one round: the initial HuBERT (its weights are replaced by the received
    ones), masked prediction of the client's labels, and its label head kept local when the codebooks are."""
    num_classes = int(info["num_classes"])
    torch.manual_seed(cfg.seed)  # the server's initial model: a new client's head starts from the same one
    model = build_hubert(cfg.model, num_classes)
    enable_checkpointing(model, cfg.train.checkpoint_layers, cfg.train.checkpoint_cnn)
    return LocalTask(
        model=model,
        objective=MaskedPrediction(cfg.loss, cfg.model.normalize_waveform),
        head_keys=LABEL_HEAD_KEYS if bool(info["local_head"]) else (),
        num_classes=num_classes,
        rate=LabelRate(int(info["label_rate"]), cfg.model),
        with_labels=True,
    )


def train_round(message: Message, context: Context) -> Message:
    return local_round(message, context, PretrainConfig, local_task)
