"""Frozen models and their time-pooled hidden states: a fedhubert checkpoint (a HuBERT or a distilled student),
or its architecture freshly initialised, run in eval mode without gradients, clip batches of one length at a
time (no padding, so a clip's features do not depend on the clips it is batched with)."""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fedhubert.audio import read_audio
from fedhubert.eval.keyword_clips import ProbeError
from fedhubert.model.checkpoint import CheckpointError, load_checkpoint, model_config_of
from fedhubert.runlog import progress

RANDOM_INIT_SEED = 0  # torch seed of a random_init model: the same architecture gives the same weights
KINDS = ("hubert", "distiller")


@dataclass
class FrozenModel:
    """A model whose `hidden_states(wave)` are [CNN/projection output, transformer layer 1, ..., layer N]."""

    name: str
    kind: str
    checkpoint: Path
    random_init: bool
    architecture: str  # e.g. "hubert 2x64": transformer layers x width
    module: nn.Module
    num_layers: int
    conv_layers: list[tuple[int, int, int]]
    hidden_states: Callable[[Tensor], list[Tensor]]

    def min_samples(self) -> int:
        """The shortest input from which the CNN makes one frame."""
        n = 1
        for _, kernel, stride in reversed(self.conv_layers):
            n = (n - 1) * stride + kernel
        return n


def read_payload(path: Path) -> dict:
    """A HuBERT or distilled-student checkpoint; other files and kinds stop with an error naming the file."""
    try:
        payload = load_checkpoint(path)
    except CheckpointError as error:
        if Path(str(path) + ".json").is_file():
            raise ProbeError(
                f"{path} is an S3PRL export, not a fedhubert checkpoint: pass the checkpoint it was exported from"
            ) from None
        raise ProbeError(str(error)) from None
    if payload["kind"] not in KINDS:
        raise ProbeError(
            f"{path} holds a '{payload['kind']}' model; the probe takes a HuBERT (from train-local or "
            f"pretrain) or a distilled student (from distill)"
        )
    return payload


def transformer_layers(payload: dict) -> int:
    if payload["kind"] == "distiller":
        return int(payload["model"]["distiller"]["encoder_layers"])
    return model_config_of(payload).layers


def check_layer(checkpoint: Path, num_layers: int, layer: int | None) -> None:
    """Hidden state `layer` (None: all) must exist in a model of `num_layers` transformer layers."""
    if layer is not None and layer > num_layers:
        raise ProbeError(
            f"layer={layer}, but {checkpoint} has {num_layers} transformer layers (hidden states 0 to "
            f"{num_layers}); choose one of those, or layer=null for all"
        )


def architecture_key(payload: dict) -> str:
    """Equal for checkpoints whose random initialisation would be the same model."""
    model = payload["model"]["distiller"] if payload["kind"] == "distiller" else payload["model"]
    text = json.dumps([payload["kind"], model, payload["num_classes"]], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def default_name(path: Path) -> str:
    """`<run>/<file stem>`: the run folder is the one above checkpoints/ (or the checkpoint's own folder)."""
    path = Path(path)
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return f"{run.name}/{path.stem}" if run.name else path.stem


def frozen_model(path: Path, payload: dict, *, random_init: bool, name: str) -> FrozenModel:
    """The checkpoint's model (or its architecture initialised with seed 0), frozen in eval mode on the CPU."""
    if random_init:
        torch.manual_seed(RANDOM_INIT_SEED)
    if payload["kind"] == "hubert":
        from fedhubert.model.hubert import build_hubert, hidden_states

        cfg = model_config_of(payload)
        module = build_hubert(cfg, payload["num_classes"])
        if not random_init:
            module.load_state_dict(payload["state_dict"])

        def states(wave: Tensor) -> list[Tensor]:
            return hidden_states(module, wave, None, cfg.normalize_waveform)

        layers, width, conv = cfg.layers, cfg.embed_dim, [tuple(c) for c in cfg.conv_layers]
    else:
        from fedhubert.model.student import Student

        config = payload["model"]["distiller"]
        module = Student(config)
        if not random_init:
            weights = {
                k[len("distiller.") :]: v for k, v in payload["state_dict"].items() if k.startswith("distiller.")
            }
            module.distiller.load_state_dict(weights)

        def states(wave: Tensor) -> list[Tensor]:
            _, layer_hiddens, projected = module.encode(wave)
            return [projected, *layer_hiddens]

        layers, width = config["encoder_layers"], config["encoder_embed_dim"]
        conv = [tuple(c) for c in ast.literal_eval(config["extractor_conv_feature_layers"])]
    module.eval()
    module.requires_grad_(False)
    return FrozenModel(
        name=name,
        kind=payload["kind"],
        checkpoint=Path(path),
        random_init=random_init,
        architecture=f"{payload['kind']} {layers}x{width}",
        module=module,
        num_layers=layers,
        conv_layers=conv,
        hidden_states=states,
    )


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Clip indices in batches of at most `batch_size` clips of one length each (in order of length)."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        if batches and len(batches[-1]) < batch_size and lengths[batches[-1][0]] == lengths[index]:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def pooled_features(
    model: FrozenModel,
    paths: list[Path],
    lengths: list[int],
    *,
    layer: int | None,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """(clips, dims): per clip, the time-mean of hidden state `layer`, or of every hidden state concatenated
    (layer None), in the order of `paths`."""
    check_layer(model.checkpoint, model.num_layers, layer)
    short = [f"{p} ({n} samples)" for p, n in zip(paths, lengths, strict=True) if n < model.min_samples()]
    if short:
        raise ProbeError(
            f"{len(short)} clips are shorter than the {model.min_samples()} samples the CNN of "
            f"{model.checkpoint} needs for one frame (e.g. {short[0]}); remove them or pick words "
            f"without them (key 'words')"
        )
    model.module.to(device)
    features: np.ndarray | None = None
    batches = length_batches(lengths, batch_size)
    with torch.no_grad():
        for batch in progress(batches, desc=f"features {model.name}", unit="batch"):
            wave = torch.from_numpy(np.stack([read_audio(paths[i]) for i in batch])).to(device)
            states = model.hidden_states(wave)
            chosen = states if layer is None else [states[layer]]
            pooled = torch.cat([s.float().mean(dim=1) for s in chosen], dim=1).cpu().numpy()
            if features is None:
                features = np.empty((len(paths), pooled.shape[1]), dtype=np.float32)
            features[batch] = pooled
    model.module.to("cpu")
    assert features is not None
    return features
