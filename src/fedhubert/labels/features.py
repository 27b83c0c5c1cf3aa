"""MFCC features of a client's manifests, computed once, in parallel, and kept on disk for every later step.

Per manifest split (e.g. `client_0/train`) the feature folder holds `train.feats.npy` (all frames, float16 or
float32, shape (frames, 39), opened as a memory map), `train.offsets.npy` (utterance i is rows offsets[i] to
offsets[i+1]) and `train.meta.json` (written last: the manifest's hash and the feature settings). Frame counts
follow from the manifest's num_samples, so workers write straight into their rows. A decoded length that differs
from the manifest, or unreadable audio, stops with an error naming every such row: labels must never be
silently misaligned with the manifest.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from fedhubert.atomic import atomic_write_text
from fedhubert.audio import read_audio
from fedhubert.errors import AudioError, FedhubertError
from fedhubert.labels.config import FeaturesConfig
from fedhubert.labels.mfcc import FEATURE_DIM, KaldiMfcc, MfccConstants, kaldi_constants, num_frames
from fedhubert.manifest import Manifest, file_sha256, read_manifest
from fedhubert.parallel import parallel_map

log = logging.getLogger(__name__)

FORMAT = "fedhubert-mfcc-v1"
_CHUNK_SECONDS = 120.0  # audio per worker task


class FeatureError(FedhubertError):
    """Features cannot be computed or do not match their manifest."""


@dataclass
class FeatureSet:
    """Read side: one manifest's features as a memory map, utterance by utterance."""

    feats: np.ndarray  # (frames, 39), memory-mapped
    offsets: np.ndarray  # (utterances + 1,)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_frames(self) -> int:
        return int(self.offsets[-1])

    def utterance(self, index: int) -> np.ndarray:
        return self.feats[self.offsets[index] : self.offsets[index + 1]]


def _paths(prefix: Path) -> tuple[Path, Path, Path]:
    return (prefix.with_name(prefix.name + ".feats.npy"), prefix.with_name(prefix.name + ".offsets.npy"),
            prefix.with_name(prefix.name + ".meta.json"))


def _expected_meta(manifest_path: Path, settings: FeaturesConfig, manifest: Manifest) -> dict:
    return {"format": FORMAT, "kind": "mfcc39", "cmvn": settings.cmvn, "dtype": settings.dtype, "manifest_sha256": file_sha256(manifest_path), "utterances": len(manifest),
            "frames": int(sum(num_frames(e.num_samples) for e in manifest.entries))}


def is_current(prefix: Path, manifest_path: Path, settings: FeaturesConfig) -> bool:
    """Whether features at `prefix` were made from this manifest with these settings (and finished)."""
    feats, offsets, meta = _paths(prefix)
    if not (feats.is_file() and offsets.is_file() and meta.is_file()):
        return False
    try:
        recorded = json.loads(meta.read_text())
    except ValueError:
        return False
    return recorded == _expected_meta(manifest_path, settings, read_manifest(manifest_path))


def load_features(prefix: Path, manifest_path: Path, settings: FeaturesConfig) -> FeatureSet:
    if not is_current(prefix, manifest_path, settings):
        raise FeatureError(
            f"no current features at {prefix} for {manifest_path}: they are missing, unfinished, or were made from "
            f"another manifest or settings; run 'fedhubert kmeans' to compute them"
        )
    feats, offsets, _ = _paths(prefix)
    return FeatureSet(np.load(feats, mmap_mode="r"), np.load(offsets))


@dataclass(frozen=True)
class _Task:
    feats_path: str
    rows: tuple[tuple[int, int, str, int, int], ...]  # (manifest line, frame offset, audio path, num_samples, frames)
    cmvn: bool
    constants: MfccConstants  # built once by the parent with torchaudio; the worker never imports torch


def _featurise(task: _Task) -> tuple[list[str], float]:
    """Worker: write the features of some utterances into their rows; return problems and audio seconds."""
    extractor = KaldiMfcc(cmvn=task.cmvn, constants=task.constants)
    out = np.load(task.feats_path, mmap_mode="r+")
    problems, seconds = [], 0.0
    for line, offset, path, num_samples, frames in task.rows:
        try:
            wav = read_audio(Path(path))
        except AudioError as err:
            problems.append(f"manifest line {line}: {err}")
            continue
        if len(wav) != num_samples:
            problems.append(f"manifest line {line}: {path} has {len(wav)} samples, the manifest says {num_samples}")
            continue
        out[offset : offset + frames] = extractor(wav)
        seconds += num_samples / 16000
    out.flush()
    return problems, seconds


def featurise(
    jobs: list[tuple[Path, Path]], settings: FeaturesConfig, *, workers: int, desc: str = "MFCC features"
) -> dict:
    """Compute features for each (manifest path, output prefix) whose cached features are not current."""
    started = time.perf_counter()
    tasks: list[_Task] = []
    constants = kaldi_constants()
    pending: list[tuple[Path, Path, dict, np.ndarray]] = []
    reused = 0
    for manifest_path, prefix in jobs:
        if is_current(prefix, manifest_path, settings):
            reused += 1
            continue
        manifest = read_manifest(manifest_path)
        frames = np.array([num_frames(e.num_samples) for e in manifest.entries], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(frames)]).astype(np.int64)
        feats_path, offsets_path, meta_path = _paths(prefix)
        meta_path.unlink(missing_ok=True)  # unfinished until the meta file is written again
        prefix.parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(feats_path, mode="w+", dtype=settings.dtype, shape=(int(offsets[-1]), FEATURE_DIM))
        np.save(offsets_path, offsets)
        rows, budget = [], 0.0
        for i, entry in enumerate(manifest.entries):
            rows.append((i + 2, int(offsets[i]), str(manifest.root / entry.path), entry.num_samples, int(frames[i])))
            budget += entry.num_samples / 16000
            if budget >= _CHUNK_SECONDS:
                tasks.append(_Task(str(feats_path), tuple(rows), settings.cmvn, constants))
                rows, budget = [], 0.0
        if rows:
            tasks.append(_Task(str(feats_path), tuple(rows), settings.cmvn, constants))
        pending.append((manifest_path, prefix, _expected_meta(manifest_path, settings, manifest), frames))
    problems: list[str] = []
    seconds = 0.0
    for _, (task_problems, task_seconds) in parallel_map(_featurise, tasks, workers=workers, desc=desc, unit="chunk"):
        problems.extend(task_problems)
        seconds += task_seconds
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise FeatureError(
            f"{len(problems)} utterances cannot be featurised as their manifests describe them:\n  {shown}{more}\n"
            f"The manifests no longer match the audio: re-run 'fedhubert partition' (with verify_audio=true to "
            f"leave out unreadable files) and then k-means again."
        )
    for manifest_path, prefix, meta, frames in pending:
        short = int(np.sum(frames == 0))
        if short:
            log.warning("%s: %d utterances are shorter than one 25 ms window and get no labels", manifest_path, short)
        atomic_write_text(_paths(prefix)[2], json.dumps(meta, indent=2) + "\n")
    elapsed = time.perf_counter() - started
    stats = {"computed": len(pending), "reused": reused, "audio_hours": round(seconds / 3600, 4),
             "seconds": round(elapsed, 2),
             "hours_per_minute": round(seconds / 3600 / (elapsed / 60), 2) if seconds else None}
    if pending:
        log.info("featurised %.2f h of audio in %.1f s (%d manifests; %d reused from the cache)",
                 seconds / 3600, elapsed, len(pending), reused)
    return stats
