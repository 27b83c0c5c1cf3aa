"""Activation memory: an estimate from the shapes (for memory-aware batch sizes) and a measurement.

The estimate counts, per utterance of n samples (T = n / 320 transformer frames), the tensors autograd keeps
for the backward pass:
- CNN: for each block with C channels and T_l output frames, about 3 C T_l values (convolution output, norm,
  GELU), plus the input waveform; with CNN checkpointing only each block's input.
- Transformer layer (width d, FFN f, h heads): about 10 T d + 2 T f values, h T^2 attention weights, and one byte
  per element of each dropout mask (2 T d + T f + h T^2); with layer checkpointing only the layer input T d,
  plus one layer's worth recomputed at a time.
- Logits: masked frames x (K + 1) values, and the projections (T x final_dim).
Values take 4 bytes in fp32, 2 under bf16/fp16 autocast (the masks 1). `measure_saved_bytes` counts what autograd
really keeps (saved-tensor hooks), on any device; the benchmark and a test hold the two together.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fedhubert.model.config import FEATURE_STRIDE, ModelConfig
from fedhubert.train.config import TrainConfig


def estimate_activation_bytes(
    model: ModelConfig,
    batch: int,
    samples: int,
    *,
    num_classes: int,
    precision: str = "fp32",
    checkpoint_layers: bool = False,
    checkpoint_cnn: bool = False,
) -> int:
    value = 4 if precision == "fp32" else 2
    frames = max(1, samples // FEATURE_STRIDE)
    d, f, h = model.embed_dim, model.ffn_dim, model.heads
    cnn, length = 0.0, samples
    for channels, kernel, stride in model.conv_layers:
        length = (length - kernel) // stride + 1
        cnn += (channels * length if checkpoint_cnn else 3 * channels * length) * value
    cnn += samples * 4
    layer_values = 10 * frames * d + 2 * frames * f + h * frames**2
    layer_masks = 2 * frames * d + frames * f + h * frames**2
    layer = layer_values * value + layer_masks
    if checkpoint_layers:
        transformer = model.layers * frames * d * value + layer
    else:
        transformer = model.layers * layer
    masked = model.mask_prob * frames
    head = (masked * (num_classes + 1) * 3 + frames * model.final_dim * 2 + frames * d * 2) * 4
    return int(batch * (cnn + transformer + head))


def max_batch_size(
    model: ModelConfig,
    budget_bytes: float,
    *,
    num_classes: int,
    precision: str,
    checkpoint_layers: bool,
    checkpoint_cnn: bool,
):
    """A function crop length -> the largest batch whose estimated activations fit `budget_bytes`."""

    def cap(samples: int) -> int:
        one = estimate_activation_bytes(
            model,
            1,
            samples,
            num_classes=num_classes,
            precision=precision,
            checkpoint_layers=checkpoint_layers,
            checkpoint_cnn=checkpoint_cnn,
        )
        return max(1, int(budget_bytes // one))

    return cap


def batch_cap(train: TrainConfig, model: ModelConfig, num_classes: int):
    """The memory-aware batch-size cap for `train.data.memory_budget_gb` (None without a budget)."""
    if not train.data.memory_budget_gb:
        return None
    return max_batch_size(
        model,
        train.data.memory_budget_gb * 2**30,
        num_classes=num_classes,
        precision=train.precision,
        checkpoint_layers=train.checkpoint_layers,
        checkpoint_cnn=train.checkpoint_cnn,
    )


@contextmanager
def measure_saved_bytes() -> Iterator[dict]:
    """Counts the bytes of every distinct tensor storage (parameters and their views aside) that autograd keeps for
    the backward pass of what runs inside the block. Inside checkpointed segments nothing is kept (checkpointing's
    own hooks take precedence), which is the point of checkpointing."""
    seen: set[tuple[int, int]] = set()
    result = {"bytes": 0, "tensors": 0}

    def pack(tensor: torch.Tensor):
        base = tensor._base if tensor._base is not None else tensor
        if base.is_leaf and base.requires_grad:  # a parameter or a view of one (a transposed weight): not an activation
            return tensor
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            result["bytes"] += storage.nbytes()
            result["tensors"] += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield result
