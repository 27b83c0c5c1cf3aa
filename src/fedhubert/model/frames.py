"""Frame counts: how many frames strided windows make of a signal, without padding (the HuBERT CNN, Kaldi's
snip_edges). One rule for the CNN's 50 Hz frames and for the 100 Hz MFCC frames that iteration-1 labels come at;
torch-free, so that featurising workers import it cheaply."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fedhubert.model.config import ModelConfig

MFCC_WINDOW = 400  # samples: 25 ms at 16 kHz
MFCC_HOP = 160  # 10 ms


def frame_count(num_samples: int, windows: Iterable[tuple[int, int]]) -> int:
    """Frames left after each (kernel, stride) window in turn; 0 once fewer samples than one window remain."""
    n = num_samples
    for kernel, stride in windows:
        n = (n - kernel) // stride + 1
        if n <= 0:
            return 0
    return n


def mfcc_frames(num_samples: int) -> int:
    """MFCC frames of a signal: 1 + (L - 400) // 160, and 0 below one window."""
    return frame_count(num_samples, [(MFCC_WINDOW, MFCC_HOP)])


def cnn_frames(num_samples: int, conv_layers: Iterable[Sequence[int]]) -> int:
    """Frames a CNN of (channels, kernel, stride) layers makes of `num_samples` samples."""
    return frame_count(num_samples, [(kernel, stride) for _, kernel, stride in conv_layers])


def feature_frames(num_samples: int, cfg: ModelConfig) -> int:
    """Transformer frames the model's CNN makes of `num_samples` samples."""
    return cnn_frames(num_samples, cfg.conv_layers)
