"""Features of a client's manifests for k-means, computed once, in parallel, and kept on disk for later steps.

Two kinds: the recipe's iteration-1 MFCC (39 dims at 100 Hz), and for iteration 2 the output of one transformer
layer of a pretrained HuBERT checkpoint (its width, at 50 Hz).

Per manifest split (e.g. `client_0/train`) the feature folder holds `train.feats.npy` (all frames, float16 or
float32, opened as a memory map), `train.offsets.npy` (utterance i is rows offsets[i] to offsets[i+1]) and
`train.meta.json` (written last: the manifest's hash and what made the features). Frame counts follow from the
manifest's num_samples, so workers write straight into their rows. A decoded length that differs from the
manifest, or unreadable audio, stops with an error naming every such row: labels must never be silently
misaligned with the manifest.

Normalisation (`features.normalize`) of every dimension to zero mean and unit variance: none (the recipe), per
utterance (in the worker), or per speaker. Speaker statistics pool the speaker's frames over the manifests of one
folder featurised together (a client's train and valid); workers return them in float64 with the raw features,
which are normalised in place once all are written (from float16 raw values this adds under 0.005 standard
deviations of error), and the meta file records the hashes of the manifests pooled.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedhubert.atomic import atomic_write_text
from fedhubert.audio import SAMPLE_RATE, read_audio
from fedhubert.errors import FedhubertError
from fedhubert.labels.mfcc import FEATURE_DIM, KaldiMfcc, MfccConstants, kaldi_constants
from fedhubert.labels.settings import FeaturesConfig
from fedhubert.labels.speakers import SpeakerError, manifest_speakers
from fedhubert.manifest import Manifest, file_sha256, read_manifest
from fedhubert.model.frames import cnn_frames, mfcc_frames
from fedhubert.parallel import parallel_map

log = logging.getLogger(__name__)

FORMAT = "fedhubert-features-v3"
_CHUNK_SECONDS = 120.0  # audio per worker task
_NORMALISE_ROWS = 65536  # frames per step of speaker normalisation


class FeatureError(FedhubertError):
    """Features cannot be computed or do not match their manifest."""


@dataclass(frozen=True)
class Extractor:
    """What turns audio into k-means features. Small and picklable: workers get it with every task."""

    kind: str  # mfcc or hubert
    dims: int
    label_rate: int
    normalize: str  # none, utterance or speaker
    mfcc: MfccConstants | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    layer: int | None = None
    conv_layers: tuple[tuple[int, int, int], ...] = ()

    def frames(self, num_samples: int) -> int:
        if self.kind == "mfcc":
            return mfcc_frames(num_samples)
        return cnn_frames(num_samples, self.conv_layers)

    def meta(self) -> dict:
        return {
            "kind": self.kind,
            "dims": self.dims,
            "label_rate": self.label_rate,
            "normalize": self.normalize,
            "checkpoint_sha256": self.checkpoint_sha256,
            "layer": self.layer,
        }


def extractor_for(settings: FeaturesConfig) -> Extractor:
    """The extractor the settings describe (kept per process while the checkpoint file is unchanged: it hashes
    the checkpoint)."""
    checkpoint = Path(settings.checkpoint) if settings.checkpoint else None
    stat = checkpoint.stat() if checkpoint and checkpoint.is_file() else None
    return _extractor(
        settings.kind,
        str(checkpoint) if checkpoint else None,
        (stat.st_mtime_ns, stat.st_size) if stat else None,
        settings.layer,
        settings.normalize,
    )


@functools.lru_cache(maxsize=8)
def _extractor(
    kind: str, checkpoint: str | None, stamp: tuple[int, int] | None, layer: int, normalize: str
) -> Extractor:
    if kind == "mfcc":
        return Extractor("mfcc", FEATURE_DIM, 100, normalize, mfcc=kaldi_constants())
    from fedhubert.model.checkpoint import load_checkpoint, model_config_of

    payload = load_checkpoint(checkpoint, kind="hubert")
    model = model_config_of(payload)
    if not 1 <= layer <= model.layers:
        raise FeatureError(f"features.layer={layer} but {checkpoint} has {model.layers} layers")
    return Extractor(
        "hubert",
        model.embed_dim,
        50,
        normalize,
        checkpoint=str(Path(checkpoint).resolve()),
        checkpoint_sha256=file_sha256(checkpoint),
        layer=layer,
        conv_layers=tuple(tuple(conv) for conv in model.conv_layers),
    )


@functools.lru_cache(maxsize=2)
def _hubert(checkpoint: str, sha256: str) -> tuple:
    """The HuBERT a worker loaded, per process, by checkpoint hash: (model in eval mode, its ModelConfig)."""
    from fedhubert.model.checkpoint import load_checkpoint, model_config_of
    from fedhubert.model.hubert import build_hubert

    payload = load_checkpoint(checkpoint, kind="hubert")
    cfg = model_config_of(payload)
    model = build_hubert(cfg, payload["num_classes"])
    model.load_state_dict(payload["state_dict"])
    return model.eval(), cfg


def _hubert_features(extractor: Extractor, wav: np.ndarray) -> np.ndarray:
    import torch

    from fedhubert.model.hubert import hidden_states

    model, cfg = _hubert(extractor.checkpoint, extractor.checkpoint_sha256)
    with torch.no_grad():
        states = hidden_states(model, torch.from_numpy(wav)[None], None, cfg.normalize_waveform)
    return states[extractor.layer][0].numpy()


def extract(extractor: Extractor, wav: np.ndarray, mfcc: KaldiMfcc | None = None) -> np.ndarray:
    """(frames, dims) float32 features of one utterance (speaker normalisation comes later, over all its frames)."""
    if len(wav) < 400:
        return np.zeros((extractor.frames(len(wav)), extractor.dims), dtype=np.float32)
    feats = (
        (mfcc or KaldiMfcc(constants=extractor.mfcc))(wav)
        if extractor.kind == "mfcc"
        else _hubert_features(extractor, wav)
    )
    if extractor.normalize == "utterance":
        feats = (feats - feats.mean(axis=0)) / np.maximum(feats.std(axis=0), 1e-5)
    return feats.astype(np.float32, copy=False)


@dataclass
class FeatureSet:
    """Read side: one manifest's features as a memory map, utterance by utterance."""

    feats: np.ndarray  # (frames, dims), memory-mapped
    offsets: np.ndarray  # (utterances + 1,)
    source: Path | None = None  # the .feats.npy file, for messages

    @property
    def name(self) -> str:
        return str(self.source) if self.source else "the features"

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_frames(self) -> int:
        return int(self.offsets[-1])

    def utterance(self, index: int) -> np.ndarray:
        return self.feats[self.offsets[index] : self.offsets[index + 1]]


def _paths(prefix: Path) -> tuple[Path, Path, Path]:
    return (
        prefix.with_name(prefix.name + ".feats.npy"),
        prefix.with_name(prefix.name + ".offsets.npy"),
        prefix.with_name(prefix.name + ".meta.json"),
    )


def _expected_meta(
    manifest_path: Path, extractor: Extractor, dtype: str, manifest: Manifest, pooled: list[Path]
) -> dict:
    meta = {
        "format": FORMAT,
        **extractor.meta(),
        "dtype": dtype,
        "manifest_sha256": file_sha256(manifest_path),
        "utterances": len(manifest),
        "frames": int(sum(extractor.frames(e.num_samples) for e in manifest.entries)),
    }
    if extractor.normalize == "speaker":
        meta["speaker_stats_from"] = {path.name: file_sha256(path) for path in pooled}
    return meta


def _read_meta(path: Path) -> dict | None:
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def _is_current(
    prefix: Path, manifest_path: Path, extractor: Extractor, dtype: str, pooled: list[Path] | None = None
) -> bool:
    """Whether `prefix` holds finished features of this manifest made with these settings. `pooled`: the manifests
    whose frames speaker statistics pool (None: those the cache names, which must still be unchanged)."""
    feats, offsets, meta = _paths(prefix)
    if not (feats.is_file() and offsets.is_file()):
        return False
    recorded = _read_meta(meta)
    if recorded is None:
        return False
    if pooled is None:
        pooled = [manifest_path.parent / name for name in recorded.get("speaker_stats_from") or {}]
        if not all(path.is_file() for path in pooled):
            return False
    return recorded == _expected_meta(manifest_path, extractor, dtype, read_manifest(manifest_path), pooled)


def load_features(
    prefix: Path, manifest_path: Path, settings: FeaturesConfig, extractor: Extractor | None = None
) -> FeatureSet:
    extractor = extractor or extractor_for(settings)
    if not _is_current(prefix, manifest_path, extractor, settings.dtype):
        raise FeatureError(
            f"no current features at {prefix} for {manifest_path}: they are missing, unfinished, or were made from "
            f"another manifest or settings; run 'fedhubert kmeans' to compute them"
        )
    feats, offsets, _ = _paths(prefix)
    return FeatureSet(np.load(feats, mmap_mode="r"), np.load(offsets), feats)


@dataclass
class _Moments:
    """Float64 sums over one speaker's frames: count, sum and sum of squares per dimension."""

    count: int
    total: np.ndarray
    squares: np.ndarray

    def add(self, other: _Moments) -> None:
        self.count += other.count
        self.total += other.total
        self.squares += other.squares

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.squares / self.count - mean * mean, 0.0))
        return mean.astype(np.float32), np.maximum(std, 1e-5).astype(np.float32)


def _merge(into: dict[int, _Moments], moments: dict[int, _Moments]) -> None:
    for speaker, m in moments.items():
        if speaker in into:
            into[speaker].add(m)
        else:
            into[speaker] = m


@dataclass(frozen=True)
class _Task:
    feats_path: str
    # (manifest line, frame offset, audio path, num_samples, frames, speaker: -1 unless normalize=speaker)
    rows: tuple[tuple[int, int, str, int, int, int], ...]
    extractor: Extractor  # built once by the parent; an MFCC worker never imports torch


def _featurise(task: _Task) -> tuple[list[str], float, dict[int, _Moments]]:
    """Worker: write the features of some utterances into their rows; return problems, audio seconds and, under
    speaker normalisation, the speakers' moments of the (still raw) features."""
    if task.extractor.kind == "hubert":
        import torch

        torch.set_num_threads(1)
    mfcc = KaldiMfcc(constants=task.extractor.mfcc) if task.extractor.kind == "mfcc" else None
    out = np.load(task.feats_path, mmap_mode="r+")
    problems, seconds, moments = [], 0.0, {}
    for line, offset, path, num_samples, frames, speaker in task.rows:
        try:
            wav = read_audio(Path(path))
        except FedhubertError as err:
            problems.append(f"manifest line {line}: {err}")
            continue
        if len(wav) != num_samples:
            problems.append(f"manifest line {line}: {path} has {len(wav)} samples, the manifest says {num_samples}")
            continue
        feats = extract(task.extractor, wav, mfcc)
        out[offset : offset + frames] = feats
        if task.extractor.normalize == "speaker" and frames:
            x = feats.astype(np.float64)
            _merge(moments, {speaker: _Moments(frames, x.sum(axis=0), np.square(x).sum(axis=0))})
        seconds += num_samples / SAMPLE_RATE
    out.flush()
    return problems, seconds, moments


def _normalise_by_speaker(
    feats_path: Path, offsets: np.ndarray, speakers: np.ndarray, moments: dict[int, _Moments]
) -> None:
    """Normalise the raw features in place, run by run of rows of one speaker, with that speaker's moments."""
    out = np.load(feats_path, mmap_mode="r+")
    bounds = [*np.flatnonzero(np.diff(speakers)) + 1, len(speakers)] if len(speakers) else []
    first = 0
    for end in bounds:
        lo, hi = int(offsets[first]), int(offsets[end])
        if hi > lo:
            mean, std = moments[int(speakers[first])].mean_std()
            for start in range(lo, hi, _NORMALISE_ROWS):
                stop = min(start + _NORMALISE_ROWS, hi)
                out[start:stop] = (np.asarray(out[start:stop], dtype=np.float32) - mean) / std
        first = end
    out.flush()


def _pools(jobs: list[tuple[Path, Path]], extractor: Extractor) -> list[list[tuple[Path, Path]]]:
    """Jobs whose features are made together: under speaker normalisation those whose manifests share a folder (a
    client's train and valid, over which its speakers' statistics pool), otherwise each job alone."""
    if extractor.normalize != "speaker":
        return [[job] for job in jobs]
    by_folder: dict[Path, list[tuple[Path, Path]]] = {}
    for manifest_path, prefix in jobs:
        by_folder.setdefault(Path(manifest_path).resolve().parent, []).append((Path(manifest_path), prefix))
    return list(by_folder.values())


def _speakers(manifest: Manifest, manifest_path: Path, extractor: Extractor) -> np.ndarray:
    if extractor.normalize != "speaker":
        return np.full(len(manifest), -1, dtype=np.int64)
    try:
        return manifest_speakers(manifest, manifest_path)
    except SpeakerError as err:
        raise FeatureError(
            f"features.normalize=speaker: {err}; use features.normalize=utterance for such manifests"
        ) from None


@dataclass(frozen=True)
class _Pending:
    manifest_path: Path
    prefix: Path
    meta: dict
    offsets: np.ndarray
    speakers: np.ndarray
    pool: int  # index of its pool of jobs (speaker statistics)


def featurise(
    jobs: list[tuple[Path, Path]],
    settings: FeaturesConfig,
    *,
    workers: int,
    desc: str = "features",
    extractor: Extractor | None = None,
) -> dict:
    """Compute features for each (manifest path, output prefix) whose cached features are not current. Under
    speaker normalisation the manifests of one folder are computed (or reused) together."""
    extractor = extractor or extractor_for(settings)
    started = time.perf_counter()
    tasks: list[_Task] = []
    task_pool: list[int] = []
    pending: list[_Pending] = []
    reused = 0
    pools = _pools(jobs, extractor)
    for pool, pool_jobs in enumerate(pools):
        pooled = [manifest_path for manifest_path, _ in pool_jobs]
        if all(
            _is_current(prefix, manifest_path, extractor, settings.dtype, pooled) for manifest_path, prefix in pool_jobs
        ):
            reused += len(pool_jobs)
            continue
        for manifest_path, prefix in pool_jobs:
            manifest = read_manifest(manifest_path)
            speakers = _speakers(manifest, manifest_path, extractor)
            frames = np.array([extractor.frames(e.num_samples) for e in manifest.entries], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(frames)]).astype(np.int64)
            feats_path, offsets_path, meta_path = _paths(prefix)
            meta_path.unlink(missing_ok=True)  # unfinished until the meta file is written again
            prefix.parent.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(
                feats_path, mode="w+", dtype=settings.dtype, shape=(int(offsets[-1]), extractor.dims)
            )
            np.save(offsets_path, offsets)
            rows, budget = [], 0.0
            for i, entry in enumerate(manifest.entries):
                rows.append(
                    (
                        i + 2,
                        int(offsets[i]),
                        str(manifest.root / entry.path),
                        entry.num_samples,
                        int(frames[i]),
                        int(speakers[i]),
                    )
                )
                budget += entry.num_samples / SAMPLE_RATE
                if budget >= _CHUNK_SECONDS:
                    tasks.append(_Task(str(feats_path), tuple(rows), extractor))
                    task_pool.append(pool)
                    rows, budget = [], 0.0
            if rows:
                tasks.append(_Task(str(feats_path), tuple(rows), extractor))
                task_pool.append(pool)
            meta = _expected_meta(manifest_path, extractor, settings.dtype, manifest, pooled)
            pending.append(_Pending(manifest_path, prefix, meta, offsets, speakers, pool))
    problems: list[str] = []
    seconds = 0.0
    moments: list[dict[int, _Moments]] = [{} for _ in pools]
    for index, (task_problems, task_seconds, task_moments) in parallel_map(
        _featurise, tasks, workers=workers, desc=desc, unit="chunk"
    ):
        problems.extend(task_problems)
        seconds += task_seconds
        _merge(moments[task_pool[index]], task_moments)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise FeatureError(
            f"{len(problems)} utterances cannot be featurised as their manifests describe them:\n  {shown}{more}\n"
            f"The manifests no longer match the audio: re-run 'fedhubert partition' (with verify_audio=true to "
            f"leave out unreadable files) and then k-means again."
        )
    for item in pending:
        if extractor.normalize == "speaker":
            _normalise_by_speaker(_paths(item.prefix)[0], item.offsets, item.speakers, moments[item.pool])
        short = int(np.sum(np.diff(item.offsets) == 0))
        if short:
            log.warning("%s: %d utterances are too short for one frame and get no labels", item.manifest_path, short)
        atomic_write_text(_paths(item.prefix)[2], json.dumps(item.meta, indent=2) + "\n")
    elapsed = time.perf_counter() - started
    stats = {
        "computed": len(pending),
        "reused": reused,
        "audio_hours": round(seconds / 3600, 4),
        "seconds": round(elapsed, 2),
        "hours_per_minute": round(seconds / 3600 / (elapsed / 60), 2) if seconds else None,
    }
    if pending:
        log.info(
            "featurised %.2f h of audio (%s, normalize=%s) in %.1f s (%d manifests; %d reused from the cache)",
            seconds / 3600,
            extractor.kind,
            extractor.normalize,
            elapsed,
            len(pending),
            reused,
        )
    return stats
