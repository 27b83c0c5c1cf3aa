"""Audio and k-means labels for masked prediction: random crops with their labels, batched by seconds of audio.

Iteration-1 labels come at 100 Hz (one per 10 ms MFCC frame); the CNN emits one frame per 320 samples (50 Hz).
A crop starts at a multiple of 320 samples, so transformer frame t of a crop starting at sample s covers the
same 25 ms as MFCC frame s/160 + 2t, whose label it takes (the recipe's feature frame t -> label 2t).
Iteration-2 labels come at 50 Hz, one per CNN frame of the whole utterance: frame t takes label s/320 + t.

Batches: utterances sorted by length are grouped so that (batch size) x (crop length) stays within
`batch_seconds` (and, if set, the memory budget); every utterance in a batch is cropped to the batch's shortest
one (at most `max_seconds`), so nothing is padded. The batch order is shuffled every epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from fedhubert.audio import SAMPLE_RATE, read_audio_segment
from fedhubert.errors import FedhubertError
from fedhubert.manifest import read_aligned_lines, read_manifest
from fedhubert.model.config import FEATURE_STRIDE, ModelConfig
from fedhubert.model.frames import feature_frames, mfcc_frames
from fedhubert.train.config import DataConfig

log = logging.getLogger(__name__)


class DataError(FedhubertError):
    """Training data is missing, empty or inconsistent."""


@dataclass(frozen=True)
class Utterance:
    path: Path
    num_samples: int
    labels: np.ndarray | None  # int16 or int32, one per label frame (None: unlabelled audio)


@dataclass(frozen=True)
class LabelRate:
    """How labels map to transformer frames: 100 Hz MFCC-frame labels (iteration 1; frame t takes label 2t) or
    50 Hz labels of a HuBERT layer (iteration 2; frame t takes label t)."""

    rate: int
    model: ModelConfig

    def __post_init__(self) -> None:
        if self.rate not in (50, 100):
            raise DataError(f"label rate {self.rate} Hz is not supported (100: MFCC labels, 50: HuBERT-layer labels)")

    @property
    def hop(self) -> int:  # samples per label
        return SAMPLE_RATE // self.rate

    @property
    def step(self) -> int:  # labels per transformer frame
        return FEATURE_STRIDE // self.hop

    def frames(self, num_samples: int) -> int:
        """Labels an utterance of `num_samples` samples has."""
        return mfcc_frames(num_samples) if self.rate == 100 else feature_frames(num_samples, self.model)


def read_labelled(manifest_path: Path, labels_path: Path | None, num_classes: int, rate: LabelRate) -> list[Utterance]:
    """A manifest and its .km file, checked line by line: every label file line must have exactly the frames the
    audio length gives, and every id must be a valid class. Without a label file (distillation needs none),
    the utterances carry no labels."""
    manifest = read_manifest(manifest_path)
    if labels_path is None:
        return [Utterance(manifest.root / e.path, e.num_samples, None) for e in manifest.entries]
    lines = read_aligned_lines(labels_path, manifest, manifest_path)
    dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
    utterances = []
    for number, (entry, line) in enumerate(zip(manifest.entries, lines, strict=True), start=1):
        labels = np.array(line.split(), dtype=np.int64)
        expected = rate.frames(entry.num_samples)
        if len(labels) != expected:
            shorter = "shorter" if len(labels) < expected else "longer"
            raise DataError(
                f"{labels_path}:{number}: {len(labels)} labels, {shorter} than the {expected} frames that "
                f"{entry.path} ({entry.num_samples} samples) has; the labels do not belong to this manifest "
                f"(re-run 'fedhubert kmeans' on it)"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(
                f"{labels_path}:{number}: label ids must be in [0, {num_classes}), found {labels.min()}..{labels.max()}"
            )
        utterances.append(Utterance(manifest.root / entry.path, entry.num_samples, labels.astype(dtype)))
    return utterances


def load_utterances(
    pairs: Sequence[tuple[Path, Path | None]], num_classes: int, data: DataConfig, rate: LabelRate
) -> list[Utterance]:
    """All usable utterances of the (manifest, labels) pairs; those shorter than min_seconds are counted, logged
    and left out. No usable utterance at all is an error."""
    usable, short = [], 0
    min_samples = int(data.min_seconds * SAMPLE_RATE)
    for manifest_path, labels_path in pairs:
        for utterance in read_labelled(manifest_path, labels_path, num_classes, rate):
            if utterance.num_samples < min_samples:
                short += 1
            else:
                usable.append(utterance)
    if short:
        log.info("%d utterances shorter than %.1f s left out", short, data.min_seconds)
    if not usable:
        names = ", ".join(str(m) for m, _ in pairs)
        raise DataError(f"no utterance of at least {data.min_seconds} s in {names}; lower data.min_seconds or add data")
    return usable


@dataclass(frozen=True)
class Crop:
    index: int
    start: int
    samples: int


class CropBatches(Sampler[list[Crop]]):
    """Length-bucketed batches of crops within a seconds budget (and an optional per-batch size cap)."""

    def __init__(
        self,
        utterances: Sequence[Utterance],
        data: DataConfig,
        seed: int,
        max_batch_size: Callable[[int], int] | None = None,
    ):
        self.utterances = utterances
        self.seed = seed
        self.epoch = 0
        budget = int(data.batch_seconds * SAMPLE_RATE)
        max_samples = int(data.max_seconds * SAMPLE_RATE)
        order = sorted(range(len(utterances)), key=lambda i: (utterances[i].num_samples, i))
        self.batches: list[tuple[list[int], int]] = []
        i = 0
        while i < len(order):
            crop = min(max_samples, utterances[order[i]].num_samples)
            size = max(1, budget // crop)
            if max_batch_size is not None:
                size = max(1, min(size, max_batch_size(crop)))
            self.batches.append((order[i : i + size], crop))
            i += size

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[Crop]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        for b in rng.permutation(len(self.batches)):
            indices, crop = self.batches[b]
            yield [
                Crop(
                    i,
                    int(rng.integers(0, (self.utterances[i].num_samples - crop) // FEATURE_STRIDE + 1))
                    * FEATURE_STRIDE,
                    crop,
                )
                for i in indices
            ]


class CroppedAudio(Dataset):
    """Reads one crop and its labels (one per transformer frame)."""

    def __init__(self, utterances: Sequence[Utterance], rate: LabelRate):
        self.utterances = utterances
        self.rate = rate
        self.model = rate.model

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, crop: Crop) -> tuple[torch.Tensor, torch.Tensor]:
        utterance = self.utterances[crop.index]
        wav = read_audio_segment(utterance.path, crop.start, crop.start + crop.samples)
        frames = feature_frames(crop.samples, self.model)
        if utterance.labels is None:
            return torch.from_numpy(wav), torch.zeros(0, dtype=torch.int64)
        first, step = crop.start // self.rate.hop, self.rate.step
        labels = utterance.labels[first : first + step * frames : step]
        if len(labels) != frames:  # read_labelled checked the counts, so this is a bug, not bad input
            raise AssertionError(f"{utterance.path}: {len(labels)} labels for {frames} frames")
        return torch.from_numpy(wav), torch.from_numpy(labels.astype(np.int64))


@dataclass
class Batch:
    waveforms: torch.Tensor  # (B, samples)
    labels: torch.Tensor  # (B, frames)

    @property
    def seconds(self) -> float:
        return self.waveforms.numel() / SAMPLE_RATE


def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
    return Batch(torch.stack([w for w, _ in items]), torch.stack([label for _, label in items]))


def batch_loader(
    utterances: Sequence[Utterance],
    rate: LabelRate,
    data: DataConfig,
    seed: int,
    max_batch_size: Callable[[int], int] | None = None,
) -> torch.utils.data.DataLoader:
    sampler = CropBatches(utterances, data, seed, max_batch_size)
    return torch.utils.data.DataLoader(
        CroppedAudio(utterances, rate),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=data.num_workers,
        persistent_workers=data.num_workers > 0,
    )


def label_counts(utterances: Sequence[Utterance], num_classes: int) -> np.ndarray:
    """How often each cluster occurs in the utterances' labels (the label-frequency baseline's distribution)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for utt in utterances:
        if utt.labels is not None:
            counts += np.bincount(np.asarray(utt.labels, dtype=np.int64), minlength=num_classes)[:num_classes]
    return counts
