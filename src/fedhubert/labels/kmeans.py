"""k-means on a client's MFCC frames: the recipe's MiniBatchKMeans, assignment, cluster statistics and label files.

Also the server side of federated k-means: an initial codebook from the clients' local centroids (weighted by
their counts) and the Lloyd update from per-cluster sums and counts, with empty clusters re-seeded by splitting
the cluster of largest squared error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedhubert.errors import FedhubertError
from fedhubert.labels.features import FeatureSet
from fedhubert.labels.settings import MiniBatchConfig
from fedhubert.manifest import Manifest, write_aligned_lines
from fedhubert.model.frames import mfcc_frames

if TYPE_CHECKING:
    from sklearn.cluster import MiniBatchKMeans

_CHUNK = 65536  # frames per distance computation


class KMeansError(FedhubertError):
    """k-means cannot be fitted on this data."""


def sample_size(total: int, fraction: float, min_frames: int) -> int:
    """Frames to fit on: `fraction` of `total`, but at least `min_frames` (and at most all)."""
    return min(total, max(int(round(fraction * total)), min_frames))


def sample_frames(frames: np.ndarray, fraction: float, min_frames: int, rng: np.random.Generator) -> np.ndarray:
    """A random sample (in order) of the rows of `frames`, as float32."""
    size = sample_size(len(frames), fraction, min_frames)
    if size == len(frames):
        return np.asarray(frames, dtype=np.float32)
    return np.asarray(frames[np.sort(rng.choice(len(frames), size=size, replace=False))], dtype=np.float32)


def _check_finite(x: np.ndarray, first_row: int, where: str) -> None:
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = first_row + int(np.flatnonzero(~finite)[0])
        raise KMeansError(
            f"{where}: frame {row} holds NaN or infinite values, so no cluster can be found for it. The "
            f"features are corrupt: delete them and run again (they are recomputed from the audio)"
        )


def fit_minibatch(frames: np.ndarray, num_clusters: int, cfg: MiniBatchConfig, seed: int, who: str) -> MiniBatchKMeans:
    _check_finite(frames, 0, f"the frames sampled for {who}")
    if len(frames) < num_clusters:
        raise KMeansError(
            f"{who} has {len(frames)} frames, fewer than num_clusters={num_clusters}; lower num_clusters, raise "
            f"sample_fraction, or give this client more audio"
        )
    from sklearn.cluster import MiniBatchKMeans  # here: a training client process never fits k-means (2.6 s import)

    model = MiniBatchKMeans(
        n_clusters=num_clusters,
        init=cfg.init,
        max_iter=cfg.max_iter,
        batch_size=cfg.batch_size,
        tol=cfg.tol,
        max_no_improvement=cfg.max_no_improvement,
        n_init=cfg.n_init,
        reassignment_ratio=cfg.reassignment_ratio,
        random_state=seed,
        compute_labels=True,
        verbose=0,
    )
    return model.fit(frames)


def assign(
    frames: np.ndarray, centroids: np.ndarray, where: str = "the features", first_row: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each frame and the squared distance to it, in chunks (float32 distances). A NaN or
    infinite frame (`where` names their file, whose rows `frames` starts at `first_row`) is an error: its nearest
    centroid would be a silent 0."""
    centroids = np.asarray(centroids, dtype=np.float32)
    c_norm = np.einsum("kd,kd->k", centroids, centroids)
    labels = np.empty(len(frames), dtype=np.int64)
    dists = np.empty(len(frames), dtype=np.float64)
    for start in range(0, len(frames), _CHUNK):
        x = np.asarray(frames[start : start + _CHUNK], dtype=np.float32)
        _check_finite(x, first_row + start, where)
        d = np.einsum("nd,nd->n", x, x)[:, None] - 2.0 * x @ centroids.T + c_norm[None, :]
        best = np.argmin(d, axis=1)
        labels[start : start + len(x)] = best
        dists[start : start + len(x)] = np.maximum(d[np.arange(len(x)), best], 0.0)
    return labels, dists


@dataclass
class ClusterStats:
    """What a client reveals in a Lloyd round: per-cluster sums, sums of squares and counts, and its inertia."""

    sums: np.ndarray  # (K, D) float64
    sumsq: np.ndarray  # (K, D) float64
    counts: np.ndarray  # (K,) int64
    inertia: float
    frames: int


def cluster_stats(features: FeatureSet, centroids: np.ndarray) -> ClusterStats:
    k, dim = centroids.shape
    sums, sumsq, counts, inertia = np.zeros((k, dim)), np.zeros((k, dim)), np.zeros(k, dtype=np.int64), 0.0
    for start in range(0, features.num_frames, _CHUNK):
        x = np.asarray(features.feats[start : start + _CHUNK], dtype=np.float64)
        labels, dists = assign(x, centroids, features.name, start)
        np.add.at(sums, labels, x)
        np.add.at(sumsq, labels, x * x)
        counts += np.bincount(labels, minlength=k)
        inertia += float(dists.sum())
    return ClusterStats(sums, sumsq, counts, inertia, features.num_frames)


def initial_codebook(local: list[tuple[np.ndarray, np.ndarray]], num_clusters: int, seed: int) -> np.ndarray:
    """Cluster the clients' local centroids, weighted by how many frames each stands for, into K centroids."""
    points = np.concatenate([c for c, _ in local]).astype(np.float64)
    weights = np.concatenate([w for _, w in local]).astype(np.float64)
    if len(points) < num_clusters:
        raise KMeansError(
            f"the clients shared {len(points)} local centroids, fewer than num_clusters={num_clusters}; lower "
            f"num_clusters or lloyd.min_shared_count, or give the clients more audio"
        )
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit(points, sample_weight=weights)
    return model.cluster_centers_


def centred(stats: ClusterStats, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The statistics about the centroids they were assigned to, in float32 for the wire: per cluster, the sum of
    x - c and of (x - c)^2. Centred, they are small next to the raw sums (768-dim HuBERT features, millions of
    frames), so float32 keeps them exact enough and halves a reply."""
    counts = stats.counts[:, None].astype(np.float64)
    dsums = stats.sums - counts * centroids
    dsumsq = stats.sumsq - 2 * centroids * stats.sums + counts * np.square(centroids)
    return dsums.astype(np.float32), dsumsq.astype(np.float32)


def uncentred(
    centred_sums: np.ndarray,
    centred_sumsq: np.ndarray,
    counts: np.ndarray,
    centroids: np.ndarray,
    inertia: float,
    frames: int,
) -> ClusterStats:
    """The inverse of `centred` (about the same centroids, as the client received them), in float64."""
    c, n = centroids.astype(np.float64), counts.astype(np.float64)[:, None]
    dsums, dsumsq = centred_sums.astype(np.float64), centred_sumsq.astype(np.float64)
    sums = dsums + n * c
    return ClusterStats(sums, dsumsq + 2 * c * dsums + n * np.square(c), counts.astype(np.int64), inertia, frames)


class StatsSum:
    """A Lloyd round's replies summed as they arrive, so that the server holds one sum and not a reply per client:
    the clients' centred statistics (about the centroids they were all sent) in float64, their counts, and each
    client's inertia and frames (for the round's inertia and its sampling error). Centring is linear, so `total()`
    is the sum of each reply's `uncentred` statistics. Replies come in no fixed order: float64 sums keep the
    float32 codebook independent of it, and the inertia is summed by client."""

    def __init__(self, centroids: np.ndarray):
        self.centroids = centroids
        self.dsums = np.zeros(centroids.shape)
        self.dsumsq = np.zeros(centroids.shape)
        self.counts = np.zeros(len(centroids), dtype=np.int64)
        self.inertia: dict[int, float] = {}
        self.frames: dict[int, int] = {}

    def add(
        self, client: int, centred_sums: np.ndarray, centred_sumsq: np.ndarray, counts: np.ndarray, inertia: float
    ) -> None:
        self.dsums += centred_sums
        self.dsumsq += centred_sumsq
        self.counts += counts.astype(np.int64)
        self.inertia[client], self.frames[client] = float(inertia), int(counts.sum())

    def __len__(self) -> int:
        return len(self.inertia)

    def per_client(self) -> tuple[np.ndarray, np.ndarray]:
        """Each client's inertia and frames, by client index."""
        clients = sorted(self.inertia)
        return np.array([self.inertia[c] for c in clients]), np.array([self.frames[c] for c in clients], dtype=float)

    def total(self) -> ClusterStats:
        inertia, frames = self.per_client()
        return uncentred(self.dsums, self.dsumsq, self.counts, self.centroids, float(inertia.sum()), int(frames.sum()))


def lloyd_update(
    stats: list[ClusterStats], centroids: np.ndarray, rng: np.random.Generator, seen: np.ndarray | None = None
) -> tuple[np.ndarray, list[int]]:
    """New centroids from the clients' summed statistics; each empty cluster takes half of the cluster with the
    largest squared error (split along its standard deviation). Returns the centroids and the re-seeded ids.

    With `seen` (the frames each cluster has been assigned in earlier rounds, updated in place) the update is
    mini-batch k-means over sampled clients (Sculley 2010, as scikit-learn's MiniBatchKMeans): each centroid
    moves to the running mean of every frame it has been assigned so far, so a round's sample of clients refines
    the codebook instead of replacing it, and a cluster is empty only if no round has assigned it a frame."""
    sums = sum(s.sums for s in stats)
    sumsq = sum(s.sumsq for s in stats)
    counts = sum(s.counts for s in stats).astype(np.float64)
    new = centroids.astype(np.float64).copy()
    before = np.zeros_like(counts) if seen is None else seen.copy()
    total = before + counts
    filled = total > 0
    new[filled] = (before[filled, None] * new[filled] + sums[filled]) / total[filled, None]
    sse = np.where(counts[:, None] > 0, sumsq - np.square(sums) / np.maximum(counts, 1)[:, None], 0.0)
    per_cluster = sse.sum(axis=1)
    reseeded = []
    for empty in np.flatnonzero(~filled):
        big = int(np.argmax(per_cluster))
        std = np.sqrt(np.maximum(sse[big] / max(counts[big], 1), 1e-12))
        step = 0.5 * std * rng.choice([-1.0, 1.0], size=std.shape)
        new[empty], new[big] = new[big] + step, new[big] - step
        per_cluster[big] /= 4  # both halves are smaller; spread further re-seeds over other clusters
        total[empty] = total[big] = total[big] / 2
        reseeded.append(int(empty))
    if seen is not None:
        seen[:] = total
    return new, reseeded


def label_lines(features: FeatureSet, centroids: np.ndarray) -> tuple[list[str], np.ndarray, float]:
    """One line of space-separated cluster ids per utterance, the usage histogram and the total squared error."""
    labels, dists = assign(features.feats, centroids, features.name)
    lines = [" ".join(map(str, labels[features.offsets[i] : features.offsets[i + 1]])) for i in range(len(features))]
    return lines, np.bincount(labels, minlength=len(centroids)), float(dists.sum())


def write_label_file(
    path: Path, lines: list[str], manifest: Manifest, frames: Callable[[int], int] = mfcc_frames
) -> None:
    """Write a .km file after checking it against its manifest: one line per row, `frames(num_samples)` ids per
    line (one per 10 ms MFCC frame by default)."""
    # Not strict: a line count that differs is reported, naming the file, by write_aligned_lines below.
    for i, (line, entry) in enumerate(zip(lines, manifest.entries, strict=False)):
        expected = frames(entry.num_samples)
        got = len(line.split())
        if got != expected:
            raise KMeansError(
                f"{path}: line {i + 1} has {got} labels but {entry.path} ({entry.num_samples} samples) has "
                f"{expected} frames"
            )
    write_aligned_lines(path, lines, len(manifest))
