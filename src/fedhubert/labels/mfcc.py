"""The HuBERT recipe's iteration-1 features: Kaldi MFCC (13 cepstra, 23 mel bins, 25 ms / 10 ms, no energy,
dither 0, snip edges) plus deltas and delta-deltas: 39 dimensions at 100 Hz.

`torchaudio.compliance.kaldi.mfcc` and `torchaudio.functional.compute_deltas` define the numbers (a test holds
ours to them, and `reference_features` is that pipeline call for call). `KaldiMfcc` takes the window, the mel
filterbank and the DCT from torchaudio once (`kaldi_constants`), then runs the per-frame arithmetic in NumPy.
That is faster than rebuilding the filterbank on every call, and it lets featurising worker processes start
without importing torch (about 2 s each).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import fft as sp_fft

from fedhubert.model.frames import MFCC_HOP, MFCC_WINDOW

SAMPLE_RATE = 16000
FFT = 512
NUM_CEPS = 13
NUM_MEL_BINS = 23
FEATURE_DIM = 3 * NUM_CEPS
FRAME_RATE = SAMPLE_RATE // MFCC_HOP  # 100 Hz
_PREEMPHASIS = 0.97
_LIFTER = 22.0
_EPSILON = np.float32(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class MfccConstants:
    window: np.ndarray  # (400,) Povey window
    mel: np.ndarray  # (257, 23) mel filterbank over the power spectrum
    dct: np.ndarray  # (23, 13) DCT with Kaldi's first row and the cepstral lifter folded in


@functools.lru_cache(maxsize=1)
def kaldi_constants() -> MfccConstants:
    """The fixed parts of Kaldi's MFCC, built with torchaudio's own functions."""
    import torch
    import torchaudio
    from torchaudio.compliance import kaldi

    window = torch.hann_window(MFCC_WINDOW, periodic=False, dtype=torch.float32).pow(0.85)
    banks, _ = kaldi.get_mel_banks(NUM_MEL_BINS, FFT, float(SAMPLE_RATE), 20.0, 0.0, 100.0, -500.0, 1.0)
    mel = torch.nn.functional.pad(banks, (0, 1)).T
    dct = torchaudio.functional.create_dct(NUM_MEL_BINS, NUM_MEL_BINS, "ortho")
    dct[:, 0] = math.sqrt(1 / NUM_MEL_BINS)
    lifter = 1.0 + 0.5 * _LIFTER * torch.sin(math.pi * torch.arange(NUM_CEPS) / _LIFTER)
    return MfccConstants(
        window=window.numpy().astype(np.float32),
        mel=np.ascontiguousarray(mel.numpy(), dtype=np.float32),
        dct=np.ascontiguousarray((dct[:, :NUM_CEPS] * lifter).numpy(), dtype=np.float32),
    )


def compute_deltas(x: np.ndarray) -> np.ndarray:
    """torchaudio.functional.compute_deltas along time (rows), window 5, edges replicated."""
    padded = np.concatenate([x[:1], x[:1], x, x[-1:], x[-1:]])
    out = padded[4:] - padded[:-4]
    out *= 2
    out += padded[3:-1]
    out -= padded[1:-3]
    out /= 10
    return out


class KaldiMfcc:
    """MFCC + deltas + delta-deltas, numerically the recipe's `kaldi.mfcc` + `compute_deltas` (x2)."""

    BLOCK = 128  # frames per FFT block: the block's buffers stay in a core's L2 cache (1.4x faster than all at once)

    def __init__(self, constants: MfccConstants | None = None):
        self.constants = constants or kaldi_constants()
        self._padded = np.zeros((self.BLOCK, FFT), dtype=np.float32)  # columns 400.. stay zero: the FFT padding

    def mfcc(self, wav: np.ndarray) -> np.ndarray:
        """(T, 13) cepstra of a 1-D float32 waveform in [-1, 1].

        Per frame x, Kaldi removes the mean m, pre-emphasises (z[j] = y[j] - 0.97 y[j-1], z[0] = 0.03 y[0]) and
        windows. Pre-emphasis is applied once to the whole signal instead; it is exact for j >= 1, column 0 is
        then set from the frame itself, and the mean's share, m * 0.03, is subtracted afterwards (both linear).
        """
        c = self.constants
        a = np.float32(_PREEMPHASIS)
        frames = sliding_window_view(wav, MFCC_WINDOW)[::MFCC_HOP]  # (T, 400) view, snip_edges
        emphasised = np.empty_like(wav)
        emphasised[1:] = wav[1:] - a * wav[:-1]
        emphasised_frames = sliding_window_view(emphasised, MFCC_WINDOW)[::MFCC_HOP]
        out = np.empty((len(frames), NUM_CEPS), dtype=np.float32)
        for start in range(0, len(frames), self.BLOCK):
            stop = min(len(frames), start + self.BLOCK)
            padded = self._padded[: stop - start]
            z = padded[:, :MFCC_WINDOW]
            z[:] = emphasised_frames[start:stop]
            z[:, 0] = frames[start:stop, 0] * (1 - a)
            z -= (frames[start:stop].mean(axis=1, dtype=np.float32) * (1 - a))[:, None]
            z *= c.window
            spectrum = sp_fft.rfft(padded, axis=1)
            power = np.square(spectrum.real)
            power += np.square(spectrum.imag)
            out[start:stop] = np.log(np.maximum(power @ c.mel, _EPSILON)) @ c.dct
        return out

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        """(T, 39) float32 features; T = mfcc_frames(len(wav))."""
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        if len(wav) < MFCC_WINDOW:
            return np.zeros((0, FEATURE_DIM), dtype=np.float32)
        ceps = self.mfcc(wav)
        deltas = compute_deltas(ceps)
        return np.concatenate([ceps, deltas, compute_deltas(deltas)], axis=1).astype(np.float32, copy=False)


def reference_features(wav: np.ndarray) -> np.ndarray:
    """The fairseq simple_kmeans way, call for call: kaldi.mfcc then compute_deltas twice (for tests and the
    benchmark's side-by-side reference)."""
    import torch
    import torchaudio
    from torchaudio.compliance import kaldi

    x = torch.from_numpy(np.asarray(wav, dtype=np.float32)).view(1, -1)
    with torch.no_grad():
        mfccs = kaldi.mfcc(waveform=x, sample_frequency=SAMPLE_RATE, use_energy=False).transpose(0, 1)
        deltas = torchaudio.functional.compute_deltas(mfccs)
        ddeltas = torchaudio.functional.compute_deltas(deltas)
        return torch.cat([mfccs, deltas, ddeltas], dim=0).transpose(0, 1).contiguous().numpy()
