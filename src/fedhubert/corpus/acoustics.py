"""Recording conditions for synthetic speech: microphone band, room reverberation, level and background noise."""

from __future__ import annotations

import numpy as np
from scipy import signal

from fedhubert.audio import SAMPLE_RATE
from fedhubert.corpus.voices import Channel

_COLOUR_EXPONENT = {"white": 0.0, "pink": 1.0, "brown": 2.0}


def coloured_noise(num_samples: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with a 1/f^k power spectrum (white k=0, pink k=1, brown k=2), unit RMS."""
    white = rng.standard_normal(num_samples)
    exponent = _COLOUR_EXPONENT[colour]
    if exponent:
        spectrum = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(num_samples, d=1.0 / SAMPLE_RATE)
        freqs[0] = freqs[1] if num_samples > 1 else 1.0
        white = np.fft.irfft(spectrum / freqs ** (exponent / 2), n=num_samples)
    rms = float(np.sqrt(np.mean(white**2))) or 1.0
    return (white / rms).astype(np.float32)


def room_impulse_response(rt60_s: float, rng: np.random.Generator) -> np.ndarray:
    """A direct path followed by exponentially decaying diffuse noise reaching -60 dB at `rt60_s`."""
    length = max(1, int(rt60_s * SAMPLE_RATE))
    t = np.arange(length) / SAMPLE_RATE
    tail = rng.standard_normal(length) * np.exp(-6.9 * t / rt60_s) * 0.3
    tail[0] = 1.0
    return (tail / np.sqrt(np.sum(tail**2))).astype(np.float32)


def rms(wav: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if wav.size else 0.0


def apply_channel(speech: np.ndarray, channel: Channel, rng: np.random.Generator) -> np.ndarray:
    """Band-limit, reverberate, set the level and add noise at the channel's SNR; peaks stay below full scale."""
    sos = signal.butter(2, [channel.highpass_hz, channel.lowpass_hz], btype="bandpass", fs=SAMPLE_RATE, output="sos")
    wav = signal.sosfilt(sos, speech).astype(np.float32)
    if channel.reverb_s > 0:
        wav = signal.fftconvolve(wav, room_impulse_response(channel.reverb_s, rng))[: len(wav)].astype(np.float32)
    level = rms(wav)
    if level > 0:
        wav *= 10 ** (channel.level_dbfs / 20) / level
    noise = coloured_noise(len(wav), channel.noise_colour, rng)
    wav = wav + noise * (rms(wav) / 10 ** (channel.snr_db / 20))
    peak = float(np.max(np.abs(wav))) if wav.size else 0.0
    if peak > 0.98:
        wav *= 0.98 / peak
    return wav.astype(np.float32)
