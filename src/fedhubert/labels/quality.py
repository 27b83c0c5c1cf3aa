"""How much k-means labels encode the speaker rather than the speech, per split of labelled data.

From the joint counts of (cluster, speaker) frames: the label entropy H(label), the mutual information
I(label; speaker) (plug-in estimates, in nats; the estimate's upward bias, about (K - 1)(S - 1) / 2N nats for
N frames of S speakers, is negligible at corpus sizes), its share of H(label), the clusters with more than half of
their frames from one speaker, and for a split other than the training one the share of its frames in clusters
that never occur in training. Speakers are read from the manifests' LibriSpeech file names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedhubert.labels.speakers import manifest_speakers
from fedhubert.manifest import ManifestError, read_aligned_lines, read_manifest

METRICS = (
    "frames",
    "speakers",
    "clusters_used",
    "entropy_nats",
    "speaker_mi_nats",
    "speaker_mi_share",
    "speaker_dominated_clusters",
    "unseen_in_train_share",
)
DOMINATED_CLUSTERS_LIMIT = 0.25  # share of the used clusters that one speaker each may dominate before a warning
MI_SHARE_LIMIT = 0.3  # share of H(label) that may be speaker information before a warning


def speaker_counts(labels: np.ndarray, speakers: np.ndarray, num_clusters: int) -> dict[int, np.ndarray]:
    """Frames per cluster of each speaker, {speaker: (num_clusters,) int64}, from per-frame labels and speakers."""
    labels, speakers = np.asarray(labels), np.asarray(speakers)
    if labels.shape != speakers.shape:
        raise ValueError(f"{labels.shape} labels but {speakers.shape} speakers: one speaker per frame is needed")
    ids, index = np.unique(speakers, return_inverse=True)
    joint = np.bincount(index * num_clusters + labels, minlength=len(ids) * num_clusters)
    return {int(s): joint[i * num_clusters : (i + 1) * num_clusters].astype(np.int64) for i, s in enumerate(ids)}


def add_counts(into: dict[int, np.ndarray], counts: dict[int, np.ndarray]) -> None:
    for speaker, c in counts.items():
        into[speaker] = into[speaker] + c if speaker in into else c.copy()


def read_speaker_counts(label_path: Path, manifest_path: Path, num_clusters: int) -> dict[int, np.ndarray]:
    """speaker_counts of a .km file, its speakers read from the manifest it is aligned with."""
    manifest = read_manifest(manifest_path)
    lines = read_aligned_lines(label_path, manifest, manifest_path)
    speakers = manifest_speakers(manifest, manifest_path)
    per_line = [np.array(line.split(), dtype=np.int64) for line in lines]
    labels = np.concatenate(per_line) if per_line else np.zeros(0, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_clusters):
        raise ManifestError(
            f"{label_path}: cluster ids must lie in 0..{num_clusters - 1}; it holds "
            f"{labels.min()}..{labels.max()} (labels of another k-means run?)"
        )
    return speaker_counts(labels, np.repeat(speakers, [len(ids) for ids in per_line]), num_clusters)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def split_quality(counts: dict[int, np.ndarray], num_clusters: int, train_usage: np.ndarray | None = None) -> dict:
    """The METRICS of one split from its speaker_counts; `train_usage` (frames per cluster in training) gives the
    unseen-in-train share (None: this is the training split). Ratios are None where undefined (no frames)."""
    joint = (
        np.stack([counts[s] for s in sorted(counts)], axis=1) if counts else np.zeros((num_clusters, 0), dtype=np.int64)
    ).astype(np.float64)
    frames = joint.sum()
    per_cluster = joint.sum(axis=1)
    used = per_cluster > 0
    result = dict.fromkeys(METRICS)
    result.update(frames=int(frames), speakers=int(np.sum(joint.sum(axis=0) > 0)), clusters_used=int(used.sum()))
    if frames == 0:
        return result
    p = joint / frames
    entropy = _entropy(p.sum(axis=1))
    mutual = max(entropy + _entropy(p.sum(axis=0)) - _entropy(p.ravel()), 0.0)
    result.update(
        entropy_nats=entropy,
        speaker_mi_nats=mutual,
        speaker_mi_share=mutual / entropy if entropy > 0 else 0.0,
        speaker_dominated_clusters=int(np.sum(joint.max(axis=1)[used] > 0.5 * per_cluster[used])),
    )
    if train_usage is not None:
        result["unseen_in_train_share"] = float(per_cluster[np.asarray(train_usage) == 0].sum() / frames)
    return result


def unavailable(splits: list[str], reason: str) -> dict:
    """The record's section when the labels cannot be read here: every metric null, and why."""
    return {"splits": {name: dict.fromkeys(METRICS) for name in splits}, "reason": reason}


def speaker_warning(name: str, metrics: dict) -> str | None:
    """A warning when the labels of a training split encode the speaker: too many speaker-dominated clusters, or
    too large a share of the label entropy that is speaker information."""
    if metrics["entropy_nats"] is None:
        return None
    dominated, used = metrics["speaker_dominated_clusters"], metrics["clusters_used"]
    share = metrics["speaker_mi_share"]
    if dominated <= DOMINATED_CLUSTERS_LIMIT * used and share <= MI_SHARE_LIMIT:
        return None
    return (
        f"{name} labels encode the speaker: {dominated} of {used} clusters have more than half of their frames "
        f"from one speaker, and I(label; speaker) is {share:.0%} of H(label) (warning above "
        f"{DOMINATED_CLUSTERS_LIMIT:.0%} of clusters or {MI_SHARE_LIMIT:.0%}): the clusters follow voices or "
        f"recording channels more than speech sounds; try features.normalize=utterance or "
        f"features.normalize=speaker"
    )
