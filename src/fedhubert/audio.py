"""The one place that opens, checks, resamples and writes audio files.

Speech models here expect 16 kHz mono. Problems are reported with the file's path and a command that fixes it,
never a bare decoder traceback.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from fedhubert.atomic import atomic_path
from fedhubert.errors import AudioError

SAMPLE_RATE = 16000

_FORMATS = {".flac": "FLAC", ".wav": "WAV"}


@dataclass(frozen=True)
class AudioInfo:
    """What an audio file's header says, read without decoding the samples."""

    path: Path
    sample_rate: int
    channels: int
    num_samples: int
    format: str
    subtype: str

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate if self.sample_rate else 0.0


_UNKNOWN_LENGTH = 2**62  # libsndfile reports about 2^63 frames when a FLAC header leaves the length unset


def _decoder_message(err: Exception) -> str:
    """libsndfile's reason without the path it repeats ("Error opening '/x.flac': Format not recognised.")."""
    text = str(err)
    return text.split("': ", 1)[1] if "': " in text else text


def audio_info(path: Path) -> AudioInfo:
    """Header-only read: sample rate, channels and length, without decoding."""
    path = Path(path)
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioError(f"cannot read the header of {path}: {_decoder_message(err)}") from None
    if info.frames >= _UNKNOWN_LENGTH:  # libsndfile cannot decode these either
        raise AudioError(
            f"cannot read the header of {path}: no length in the header (written as a stream, or empty); "
            f"re-encode it with: sox '{path}' OUT{path.suffix}"
        )
    return AudioInfo(path, int(info.samplerate), int(info.channels), int(info.frames), info.format, info.subtype)


def speech_format_problem(info: AudioInfo, sample_rate: int = SAMPLE_RATE) -> str | None:
    """A short reason why the file cannot be used as speech input (for skip lists), or None if it can."""
    if info.num_samples <= 0:
        return "empty (no samples)"
    if info.channels != 1:
        return f"{info.channels} channels (expected mono)"
    if info.sample_rate != sample_rate:
        return f"sample rate {info.sample_rate} Hz (expected {sample_rate})"
    return None


def check_speech_format(info: AudioInfo, sample_rate: int = SAMPLE_RATE) -> None:
    """Raise an AudioError (with the fix) unless the file is non-empty mono audio at `sample_rate`."""
    problem = speech_format_problem(info, sample_rate)
    if problem is None:
        return
    if info.num_samples <= 0:
        fix = "remove it or export it again"
    elif info.channels != 1:
        fix = f"convert it to mono with: sox '{info.path}' -c 1 OUT{info.path.suffix}"
    else:
        fix = f"resample it with: sox '{info.path}' -r {sample_rate} OUT{info.path.suffix}"
    raise AudioError(f"{info.path}: {problem}; {fix}")


def read_audio(path: Path, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode a mono file at `sample_rate` into float32 samples in [-1, 1]; wrong formats raise AudioError."""
    path = Path(path)
    try:
        handle = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioError(f"cannot read the header of {path}: {_decoder_message(err)}") from None
    with handle:
        info = AudioInfo(
            path, int(handle.samplerate), int(handle.channels), int(handle.frames), handle.format, handle.subtype
        )
        if info.num_samples >= _UNKNOWN_LENGTH:
            audio_info(path)  # raises the error that explains it
        check_speech_format(info, sample_rate)
        try:
            wav = handle.read(dtype="float32", always_2d=False)
        except (sf.LibsndfileError, RuntimeError, OSError) as err:
            raise AudioError(
                f"cannot decode {path}: {_decoder_message(err)}; the file is corrupt or truncated"
            ) from None
    if wav.shape[0] != info.num_samples:
        raise AudioError(
            f"{path} decoded to {wav.shape[0]} samples but its header says {info.num_samples}; the file is truncated"
        )
    _check_finite(wav, path)
    return wav


def _check_finite(wav: np.ndarray, path: Path) -> None:
    """Float WAVs can hold NaN or infinity, which would poison features and gradients downstream."""
    if not np.isfinite(wav).all():
        raise AudioError(
            f"{path} holds NaN or infinite samples (sample {int(np.flatnonzero(~np.isfinite(wav))[0])}); "
            f"the file is corrupt: export it again"
        )


def read_audio_segment(path: Path, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of a 16 kHz mono file, decoding only what is needed (a crop of a long file)."""
    try:
        wav, rate = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioError(f"cannot decode {path}: {_decoder_message(err)}") from None
    if wav.ndim != 1 or rate != SAMPLE_RATE:
        check_speech_format(audio_info(path))
    if len(wav) != stop - start:
        raise AudioError(f"{path} ended after {start + len(wav)} samples; expected at least {stop} (truncated file?)")
    _check_finite(wav, path)
    return wav


def decode_audio(data: bytes, source: str) -> tuple[np.ndarray, int]:
    """Decode in-memory audio (a WAV stream from a program, say) to float32 mono and its sample rate."""
    try:
        wav, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"cannot decode audio from {source}: {err}") from None
    return wav.mean(axis=1), int(rate)


def resample(wav: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    if orig_rate == target_rate:
        return wav.astype(np.float32, copy=False)
    return soxr.resample(wav, orig_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def write_audio(path: Path, wav: np.ndarray, sample_rate: int = SAMPLE_RATE, subtype: str = "PCM_16") -> None:
    """Write mono audio atomically; the format (FLAC or WAV) follows the file's suffix."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise AudioError(f"cannot write {path}: unsupported suffix (use one of {', '.join(_FORMATS)})")
    samples = np.clip(np.asarray(wav, dtype=np.float32), -1.0, 32767 / 32768)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), samples, sample_rate, format=fmt, subtype=subtype)
