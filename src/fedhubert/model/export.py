"""Export to the file S3PRL's `hubert_local` upstream loads (s3prl/upstream/hubert/convert.py).

`torch.save({"task_cfg", "model_cfg", "model_weight", "dictionaries_symbols"})`: fairseq HubertConfig and
HubertPretrainingConfig fields as plain dicts (`label_rate` is the checkpoint's: 100 Hz MFCC labels or 50 Hz
HuBERT-layer labels), fairseq parameter names, and one fairseq dictionary of 4 special symbols + K cluster ids.
Parameter names are mapped with torchaudio's own fairseq -> torchaudio key map, run over the names of the model
S3PRL itself builds from the exported configs; before the file is written, S3PRL's model loads the weights
strictly, so a file that S3PRL cannot load is never written. The special symbols' label embeddings are zeros
(they are never targets): fairseq's masked-prediction logits are ours with 4 more columns, each 0.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from fedhubert.model.config import ModelConfig
from fedhubert.model.fairseq_keys import torchaudio_key
from fedhubert.model.student import s3prl_distiller

SPECIAL_SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>"]  # a fairseq Dictionary's first four entries


def fairseq_model_cfg(cfg: ModelConfig, label_rate: int) -> dict[str, Any]:
    return {
        "label_rate": float(label_rate),
        "extractor_mode": "default" if cfg.extractor_mode == "group_norm" else "layer_norm",
        "encoder_layers": cfg.layers,
        "encoder_embed_dim": cfg.embed_dim,
        "encoder_ffn_embed_dim": cfg.ffn_dim,
        "encoder_attention_heads": cfg.heads,
        "activation_fn": "gelu",
        "layer_type": "transformer",
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout,
        "encoder_layerdrop": cfg.layer_drop,
        "dropout_input": cfg.projection_dropout,
        "dropout_features": 0.0,
        "final_dim": cfg.final_dim,
        "untie_final_proj": False,
        "layer_norm_first": cfg.layer_norm_first,
        "conv_feature_layers": repr([tuple(layer) for layer in cfg.conv_layers]),
        "conv_bias": cfg.conv_bias,
        "logit_temp": cfg.logit_temperature,
        "target_glu": False,
        "feature_grad_mult": cfg.feature_grad_mult,
        "mask_length": cfg.mask_length,
        "mask_prob": cfg.mask_prob,
        "mask_selection": "static",
        "mask_other": 0.0,
        "no_mask_overlap": False,
        "mask_min_space": 1,
        "mask_channel_length": cfg.mask_channel_length,
        "mask_channel_prob": cfg.mask_channel_prob,
        "mask_channel_selection": "static",
        "mask_channel_other": 0.0,
        "no_mask_channel_overlap": False,
        "mask_channel_min_space": 1,
        "conv_pos": cfg.pos_conv_kernel,
        "conv_pos_groups": cfg.pos_conv_groups,
        "skip_masked": False,
        "skip_nomask": False,
    }


def fairseq_task_cfg(cfg: ModelConfig, label_rate: int) -> dict[str, Any]:
    return {
        "label_rate": float(label_rate),
        "sample_rate": 16000,
        "normalize": cfg.normalize_waveform,
        "enable_padding": False,
        "random_crop": True,
        "pad_audio": False,
    }


def s3prl_model(task_cfg: dict, model_cfg: dict, symbols: list[list[str]]):
    from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig
    from s3prl.upstream.utils import merge_with_parent

    with warnings.catch_warnings():  # S3PRL's fairseq code uses the deprecated weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        return HubertModel(
            merge_with_parent(HubertConfig, model_cfg), merge_with_parent(HubertPretrainingConfig, task_cfg), symbols
        )


def to_s3prl_hubert(
    cfg: ModelConfig, num_classes: int, state_dict: dict[str, torch.Tensor], *, label_rate: int
) -> dict[str, Any]:
    """The `hubert_local` checkpoint content for our model's weights, trained on labels at `label_rate` Hz
    (checked by loading them into S3PRL's model)."""
    task_cfg, model_cfg = fairseq_task_cfg(cfg, label_rate), fairseq_model_cfg(cfg, label_rate)
    symbols = [SPECIAL_SYMBOLS + [str(k) for k in range(num_classes)]]
    reference = s3prl_model(task_cfg, model_cfg, symbols)
    weights = {}
    for key, template in reference.state_dict().items():
        if key == "label_embs_concat":  # fairseq row 4 + k is cluster k; the special symbols are never targets
            ours = state_dict["logit_generator.label_embeddings"]
            value = torch.cat([torch.zeros(len(SPECIAL_SYMBOLS), ours.shape[1], dtype=ours.dtype), ours])
        else:
            value = state_dict[torchaudio_key(key)]
        if value.shape != template.shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} for S3PRL's {tuple(template.shape)}")
        weights[key] = value.detach().clone().contiguous()
    reference.load_state_dict(weights, strict=True)
    return {"task_cfg": task_cfg, "model_cfg": model_cfg, "model_weight": weights, "dictionaries_symbols": symbols}


def serialise(content: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


FORMATS = {"s3prl-hubert": "hubert", "s3prl-distiller": "distiller"}  # format -> checkpoint kind


def to_s3prl_distiller(payload: dict) -> dict[str, Any]:
    """What S3PRL's `distiller_local` loads: {"Config": {"distiller": ...}, "Distiller": state_dict}; our
    masked-prediction head (if any) is left out. Checked by loading into S3PRL's DistillerModel first."""
    config = payload["model"]["distiller"]
    weights = {
        k[len("distiller.") :]: v.detach().clone().contiguous()
        for k, v in payload["state_dict"].items()
        if k.startswith("distiller.")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        s3prl_distiller(config).load_state_dict(weights, strict=True)
    return {"Config": {"distiller": config}, "Distiller": weights}


def export_checkpoint(checkpoint: Path, fmt: str, out: Path, *, force: bool = False) -> dict:
    """Convert a fedhubert checkpoint into `fmt` at `out`, with `<out>.json` recording how it was made."""
    from fedhubert import __version__
    from fedhubert.atomic import atomic_write_bytes, atomic_write_text
    from fedhubert.errors import OutputExistsError
    from fedhubert.manifest import file_sha256
    from fedhubert.model.checkpoint import CheckpointError, label_rate_of, load_checkpoint, model_config_of

    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    payload = load_checkpoint(checkpoint, kind=FORMATS[fmt])
    if fmt == "s3prl-hubert":
        content = to_s3prl_hubert(
            model_config_of(payload), payload["num_classes"], payload["state_dict"], label_rate=label_rate_of(payload)
        )
    else:
        content = to_s3prl_distiller(payload)
    atomic_write_bytes(out, serialise(content))
    upstream = "hubert_local" if fmt == "s3prl-hubert" else "distiller_local"
    record = {
        "format": fmt,
        "file": out.name,
        "sha256": file_sha256(out),
        "source_checkpoint": str(Path(checkpoint).resolve()),
        "source_sha256": file_sha256(checkpoint),
        "num_classes": payload["num_classes"],
        "label_rate": label_rate_of(payload),
        "model": payload["model"],
        "fedhubert_version": __version__,
        "load_with": f"python -m s3prl.run_downstream -u {upstream} -k {out.resolve()} ...",
    }
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(record, indent=2) + "\n")
    return record
