"""Model weights on the wire: float32 (never float64), or bfloat16 to halve the bytes (with bfloat16 the clients
send their change rather than their weights: see `fedhubert.fl.rounds`).

NumPy has no bfloat16, so bfloat16 weights travel as uint16 arrays of their bit patterns; both ends know the
encoding from the run's config (`transfer`). Whatever the transfer, the server keeps and aggregates float32.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedhubert.errors import FedhubertError

TRANSFER_DTYPE = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(np.uint16)}


class WeightsError(FedhubertError):
    """Received weights do not fit the model."""


def encode(tensors: dict[str, torch.Tensor], transfer: str) -> ArrayRecord:
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        if transfer == "bfloat16":
            out[name] = Array(tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy())
        else:
            out[name] = Array(np.ascontiguousarray(tensor.to(torch.float32).numpy()))
    return ArrayRecord(out)


def decode(record: ArrayRecord, transfer: str) -> dict[str, torch.Tensor]:
    """float32 tensors from received arrays; a dtype other than the agreed one is an error (not a silent cast)."""
    expected = TRANSFER_DTYPE[transfer]
    out = {}
    for name, array in record.items():
        value = array.numpy()
        if value.dtype != expected:
            raise WeightsError(f"array '{name}' arrived as {value.dtype}, expected {expected} ({transfer} transfer)")
        if transfer == "bfloat16":
            out[name] = torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16).to(torch.float32)
        else:
            out[name] = torch.from_numpy(value.copy())
    return out


def check_update(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], keys: Iterable[str]) -> None:
    """An update must carry exactly `keys`, with the reference's shapes, and finite values."""
    keys = set(keys)
    if set(tensors) != keys:
        missing, extra = sorted(keys - set(tensors)), sorted(set(tensors) - keys)
        raise WeightsError(f"update has the wrong parameters (missing {missing[:3]}, unexpected {extra[:3]})")
    for name in keys:
        if tuple(tensors[name].shape) != tuple(reference[name].shape):
            raise WeightsError(
                f"'{name}' has shape {tuple(tensors[name].shape)}, expected {tuple(reference[name].shape)}"
            )
        if not torch.isfinite(tensors[name]).all():
            raise WeightsError(f"'{name}' holds NaN or infinite values")
