"""Each client's own validation split: whole speakers when it has enough of them, else single utterances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedhubert.corpus.librispeech import Utterance


@dataclass(frozen=True)
class ClientSplit:
    train: list[Utterance]
    valid: list[Utterance]
    mode: Literal["speaker", "utterance", "none"]
    valid_speakers: list[int]


def split_client(
    utterances: list[Utterance], fraction: float, min_speakers: int, rng: np.random.Generator
) -> ClientSplit:
    """Hold out about `fraction` of a client's data; train keeps at least one speaker (or utterance)."""
    ordered = sorted(utterances, key=lambda u: u.path)
    speakers = sorted({u.speaker for u in ordered})
    if fraction == 0 or len(ordered) < 2:
        return ClientSplit(ordered, [], "none", [])
    if len(speakers) >= min_speakers:
        count = min(len(speakers) - 1, max(1, round(fraction * len(speakers))))
        held = sorted(int(s) for s in rng.choice(speakers, size=count, replace=False))
        chosen = set(held)
        return ClientSplit(
            [u for u in ordered if u.speaker not in chosen],
            [u for u in ordered if u.speaker in chosen],
            "speaker",
            held,
        )
    count = min(len(ordered) - 1, max(1, round(fraction * len(ordered))))
    picked = set(int(i) for i in rng.choice(len(ordered), size=count, replace=False))
    return ClientSplit(
        [u for i, u in enumerate(ordered) if i not in picked],
        [u for i, u in enumerate(ordered) if i in picked],
        "utterance",
        [],
    )
