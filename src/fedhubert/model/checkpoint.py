"""fedhubert's checkpoint files: one writer (atomic, with a SHA-256 sidecar) and one reader.

A checkpoint is `torch.save` of primitives and tensors only (torch >= 2.6 loads with weights_only):
`{"format", "kind", "model": ModelConfig as a dict, "num_classes", "label_rate", "state_dict", "state": {...}}`,
where `label_rate` is the rate (Hz) of the k-means labels the model was trained on (100: MFCC labels, iteration 1;
50: labels of a HuBERT layer, iteration 2) and `state` holds whatever the writer needs to resume (optimizer,
global step, RNG states, round, ...).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from fedhubert.atomic import atomic_path, atomic_write_text
from fedhubert.config import config_from_dict, config_to_dict
from fedhubert.errors import FedhubertError
from fedhubert.model.config import LABEL_RATE, ModelConfig

FORMAT = "fedhubert-checkpoint-v1"


class CheckpointError(FedhubertError):
    """A checkpoint is missing, corrupt, or of the wrong kind."""


def sidecar(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".sha256")


def save_checkpoint(
    path: Path,
    *,
    kind: str,
    model: ModelConfig | dict,
    num_classes: int,
    state_dict: dict,
    state: dict[str, Any] | None = None,
    label_rate: int = LABEL_RATE,
) -> str:
    """Write atomically (then its .sha256 sidecar); returns the SHA-256 of the file. `model` describes the
    architecture: a ModelConfig for a HuBERT, a plain dict for other kinds (the distiller's config);
    `label_rate` is the rate of the labels it was trained on (default: 100 Hz, MFCC labels)."""
    payload = {
        "format": FORMAT,
        "kind": kind,
        "model": model if isinstance(model, dict) else config_to_dict(model),
        "num_classes": int(num_classes),
        "label_rate": int(label_rate),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "state": state or {},
    }
    sink = None
    try:
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
            sink = _HashingFile(handle)  # streamed to disk: no in-memory copy of the serialized model
            torch.save(payload, sink)
            handle.flush()
            os.fsync(handle.fileno())
        digest = sink.sha256.hexdigest()
        atomic_write_text(sidecar(path), f"{digest}  {Path(path).name}\n")
    except (OSError, RuntimeError) as err:
        cause = sink.error if sink is not None and sink.error is not None else err
        if not isinstance(cause, OSError):
            raise
        written = f"{sink.size / 2**20:.1f} MiB written" if sink is not None else "not started"
        raise CheckpointError(
            f"cannot write checkpoint {path} ({written}): {cause.strerror}. "
            f"Earlier checkpoints are intact (writes are atomic); free space in {Path(path).parent} "
            f"or move the run, then continue with --resume"
        ) from None
    return digest


class _HashingFile:
    """A binary file that hashes what is written through it. torch.save runs the write from C++, which reports a
    failed write as a RuntimeError: the OSError is kept so that the message can say what went wrong."""

    def __init__(self, handle):
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            written = self.handle.write(data)
        except OSError as err:
            self.error = err
            raise
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return written

    def flush(self) -> None:
        self.handle.flush()


def load_checkpoint(path: Path, kind: str | None = None, verify: bool = True) -> dict:
    """Read and check a checkpoint: its SHA-256 against the sidecar (when there is one), its format and kind."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    if verify and sidecar(path).is_file():
        expected = sidecar(path).read_text().split()[0]
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(
                f"checkpoint {path} does not match its checksum ({sidecar(path).name}): the file is "
                f"corrupt or truncated"
            )
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fedhubert checkpoint (no '{FORMAT}' format tag)")
    if kind is not None and payload.get("kind") != kind:
        raise CheckpointError(f"{path} holds a '{payload.get('kind')}' model, not the '{kind}' one needed here")
    return payload


def label_rate_of(payload: dict) -> int:
    """The rate (Hz) of the labels a checkpoint's model was trained on. Checkpoints written before the rate was
    recorded per run hold a constant 100 at the top level; federated pretraining also kept the true rate in
    `state['label_rate']`, which therefore wins. Neither: 100 (MFCC labels)."""
    return int(payload.get("state", {}).get("label_rate", payload.get("label_rate", LABEL_RATE)))


def model_config_of(payload: dict) -> ModelConfig:
    return config_from_dict(ModelConfig, payload["model"], "the checkpoint's model config")
