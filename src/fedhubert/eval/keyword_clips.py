"""The labelled clips of a Speech Commands-layout folder: word (the folder), speaker (the file name before
`_nohash_`), checked for what a speaker-disjoint probe needs, with errors that name the folder and the fix."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedhubert.errors import FedhubertError
from fedhubert.eval.speech_commands_format import NOISE_DIR, SPEAKER_SEPARATOR, TRAIN_DIR


class ProbeError(FedhubertError):
    """The probe cannot run on this dataset or checkpoint."""


@dataclass(frozen=True)
class KeywordClips:
    """Clips in a fixed order (by word, then file name), with their word index and speaker."""

    root: Path  # the speech_commands_v0.01 folder
    paths: list[Path]
    words: list[str]  # class names; labels index into them
    labels: np.ndarray  # (clips,) int
    speakers: np.ndarray  # (clips,) str

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_speakers(self) -> int:
        return len(set(self.speakers.tolist()))

    @property
    def chance(self) -> float:
        """The majority class's share: the accuracy of always answering the most frequent word."""
        return float(np.bincount(self.labels).max() / len(self.labels))


def clip_folder(dataset: Path) -> Path:
    """`dataset/speech_commands_v0.01` (or `dataset` itself when it is that folder)."""
    dataset = Path(dataset)
    folder = dataset if dataset.name == TRAIN_DIR else dataset / TRAIN_DIR
    if not folder.is_dir():
        raise ProbeError(
            f"{folder} does not exist: the probe reads {dataset}/{TRAIN_DIR}/<word>/<speaker>"
            f"{SPEAKER_SEPARATOR}<n>.wav. Pass the folder that holds {TRAIN_DIR}/ as --dataset, or "
            f"make one with 'fedhubert synth speech-commands --out {dataset}'"
        )
    return folder


def list_clips(dataset: Path, *, words: list[str], folds: int, max_speakers: int = 0, seed: int = 0) -> KeywordClips:
    """Every clip of the word folders (all but _background_noise_, or only `words`), optionally of a random
    sample of `max_speakers` speakers; at least two words and `folds` speakers are needed."""
    folder = clip_folder(dataset)
    available = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != NOISE_DIR)
    missing = sorted(set(words) - set(available))
    if missing:
        raise ProbeError(f"{folder} has no word folders {missing} (it has {available}); fix key 'words'")
    chosen = sorted(words) if words else available
    files = [(word, path) for word in chosen for path in sorted((folder / word).glob("*.wav"))]
    unnamed = [str(path) for _, path in files if SPEAKER_SEPARATOR not in path.name]
    if unnamed:
        raise ProbeError(
            f"{len(unnamed)} clips in {folder} are not named <speaker>{SPEAKER_SEPARATOR}<n>.wav, so "
            f"their speaker is unknown (e.g. {unnamed[0]}); rename or remove them"
        )
    speakers = np.array([path.name.split(SPEAKER_SEPARATOR)[0] for _, path in files], dtype=object)
    if max_speakers:
        everyone = sorted(set(speakers.tolist()))
        keep = set(np.random.default_rng(seed).permutation(everyone)[:max_speakers].tolist())
        files = [f for f, s in zip(files, speakers, strict=True) if s in keep]
        speakers = np.array([s for s in speakers if s in keep], dtype=object)
    counts = Counter(word for word, _ in files)
    present = [w for w in chosen if counts[w]]
    if len(present) < 2:
        raise ProbeError(
            f"{folder} holds .wav clips of {len(present)} word(s) {present}; a probe needs at least two "
            f"word folders with clips (make a dataset with 'fedhubert synth speech-commands')"
        )
    num_speakers = len(set(speakers.tolist()))
    if num_speakers < folds:
        raise ProbeError(
            f"{folder} holds clips of {num_speakers} speaker(s); speaker-disjoint {folds}-fold "
            f"cross-validation needs at least {folds}: add speakers (e.g. 'fedhubert synth "
            f"speech-commands --speakers 10'){' or raise max_speakers' if max_speakers else ''}, or "
            f"lower folds=N"
        )
    index = {word: i for i, word in enumerate(present)}
    return KeywordClips(
        root=folder,
        paths=[path for _, path in files],
        words=present,
        labels=np.array([index[word] for word, _ in files], dtype=np.int64),
        speakers=speakers,
    )
