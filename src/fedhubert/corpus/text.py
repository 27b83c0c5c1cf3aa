"""English text for the synthetic corpora and LibriSpeech-style transcript normalisation."""

from __future__ import annotations

import functools
import re
from importlib import resources

_NOT_TRANSCRIPT = re.compile(r"[^A-Z' ]+")


@functools.lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """The bundled sentence bank (see sentences.txt), in file order."""
    text = resources.files("fedhubert.corpus").joinpath("sentences.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def normalize_transcript(text: str) -> str:
    """LibriSpeech style: upper case, apostrophes kept, other punctuation dropped, single spaces."""
    upper = text.upper().replace("-", " ")
    return " ".join(_NOT_TRANSCRIPT.sub(" ", upper).split())
