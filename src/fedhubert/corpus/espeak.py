"""Speech from espeak-ng: a fixed voice per synthetic speaker, returned as 16 kHz float32 samples."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict, dataclass

import numpy as np

from fedhubert.audio import SAMPLE_RATE, decode_audio, resample
from fedhubert.errors import MissingToolError

INSTALL_HINT = (
    "install it with 'sudo apt-get install espeak-ng' (Debian/Ubuntu), 'conda install -c conda-forge espeak-ng', "
    "or load your cluster's module (module load espeak-ng), then run again"
)


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: language/accent, variant (timbre and sex), pitch (0-99), rate (words per minute)
    and the gap between words (units of 10 ms)."""

    language: str
    variant: str
    pitch: int
    rate: int
    word_gap: int = 0

    def with_jitter(self, rng: np.random.Generator, pitch: int = 3, rate: float = 0.05) -> Voice:
        """The same speaker on another day: small changes of pitch and rate."""
        return Voice(
            self.language,
            self.variant,
            int(np.clip(self.pitch + rng.integers(-pitch, pitch + 1), 0, 99)),
            int(round(self.rate * (1 + rng.uniform(-rate, rate)))),
            self.word_gap,
        )

    def as_dict(self) -> dict:
        return asdict(self)


def espeak_binary() -> str:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise MissingToolError(f"espeak-ng was not found on PATH; it speaks the built-in corpora. {INSTALL_HINT}")
    return binary


def speak(text: str, voice: Voice) -> np.ndarray:
    """Synthesise `text` with `voice` and return mono float32 samples at 16 kHz."""
    command = [
        espeak_binary(),
        "-v",
        f"{voice.language}+{voice.variant}",
        "-p",
        str(voice.pitch),
        "-s",
        str(voice.rate),
        "-g",
        str(voice.word_gap),
        "--stdin",
        "--stdout",
    ]
    result = subprocess.run(command, input=text.encode("utf-8"), capture_output=True, timeout=120)
    if result.returncode != 0 or not result.stdout:
        raise MissingToolError(
            f"espeak-ng failed for voice {voice.language}+{voice.variant} "
            f"(exit {result.returncode}): {result.stderr.decode(errors='replace').strip()}"
        )
    wav, rate = decode_audio(result.stdout, "espeak-ng")
    return resample(wav, rate, SAMPLE_RATE)
