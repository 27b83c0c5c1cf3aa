"""`fedhubert kmeans`: MFCC features for every client, then k-means as a Flower app, then the record.

Outputs under --out: `client_<i>/{train,valid}.km` (one line of 100 Hz cluster ids per manifest row), the
codebook (`codebook.npy`, or `client_<i>/codebook.npy` per client), with a shared codebook also the server's
held-out sets `global/<subset>.km` (for server-side evaluation), `kmeans.json`, `messages.jsonl` (what crossed
the wire), `kmeans.png`, and the feature cache `features/` (reused by later runs). In simulation kmeans.json also
gets `label_quality` (how much the labels encode the speaker), read back from the label files written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import linear_sum_assignment

from fedhubert.atomic import atomic_write_text
from fedhubert.corpus.librispeech import CorpusError
from fedhubert.fl.place import ClientPlace
from fedhubert.fl.runtime.federation import run_flower_app
from fedhubert.labels.config import KMeansConfig
from fedhubert.labels.features import extractor_for, featurise, load_features
from fedhubert.labels.federated import CODEBOOK_FILE, KMEANS_FILE, SPLITS, client_place
from fedhubert.labels.kmeans import (
    KMeansError,
    assign,
    fit_minibatch,
    label_lines,
    sample_size,
    write_label_file,
)
from fedhubert.labels.quality import add_counts, read_speaker_counts, speaker_warning, split_quality, unavailable
from fedhubert.labels.speakers import SpeakerError
from fedhubert.manifest import read_manifest
from fedhubert.plots import MANY_CLIENTS, integer_ticks, plt, save_figure
from fedhubert.runlog import CONFIG_FILE, StageRun

log = logging.getLogger(__name__)


def _reference(cfg: KMeansConfig, clients: list[ClientPlace]) -> dict:
    """A centralized MiniBatchKMeans for comparison, fitted on a uniform sample of all clients' training frames (the
    clients' own share, `sample_fraction`, of the pool, at most `reference_frames`), and the inertia of it and of
    the federated codebook over every training frame, summed client by client (memory: the sample, not the pool)."""
    train = [load_features(p.work / "train", p.manifest("train"), cfg.features) for p in clients]
    bounds = np.concatenate([[0], np.cumsum([f.num_frames for f in train])])
    total = int(bounds[-1])
    size = min(sample_size(total, cfg.sample_fraction, cfg.min_sample_frames), cfg.reference_frames)
    chosen = np.sort(np.random.default_rng(cfg.seed).choice(total, size=size, replace=False))
    cuts = np.searchsorted(chosen, bounds)
    sample = np.concatenate(
        [np.asarray(f.feats[chosen[cuts[i] : cuts[i + 1]] - bounds[i]], dtype=np.float32) for i, f in enumerate(train)]
    )
    model = fit_minibatch(sample, cfg.num_clusters, cfg.minibatch, cfg.seed, "the pooled clients")
    del sample
    central = model.cluster_centers_.astype(np.float32)
    federated = np.load(clients[0].kmeans / CODEBOOK_FILE) if cfg.mode == "federated" else None
    sse, fed_sse = 0.0, 0.0
    for f in train:
        sse += float(assign(f.feats, central, f.name)[1].sum())
        if federated is not None:
            fed_sse += float(assign(f.feats, federated, f.name)[1].sum())
    reference = {"inertia": sse / total, "frames": total, "sample_frames": size}
    if federated is not None:
        reference["federated_inertia"] = fed_sse / total
        reference["relative_gap"] = fed_sse / sse - 1
    else:
        distances = []
        for p in clients:
            own = np.load(p.kmeans / p.folder / CODEBOOK_FILE)
            cost = np.linalg.norm(own[:, None, :] - central[None, :, :], axis=2)
            rows, cols = linear_sum_assignment(cost)
            distances.append(float(cost[rows, cols].mean()))
        reference["matched_centroid_distance"] = distances
        reference["mean_matched_centroid_distance"] = float(np.mean(distances))
        reference["centroid_scale"] = float(np.linalg.norm(central - central.mean(axis=0), axis=1).mean())
    return reference


def _label_heldout(cfg: KMeansConfig, partition: dict, out: Path, codebook: np.ndarray) -> dict:
    """Label the server's held-out sets (global/<subset>.tsv) with the shared codebook, for server-side evaluation."""
    features = Path(cfg.feature_dir) if cfg.feature_dir else out / "features"
    done = {}
    for subset in partition["heldout"]:
        manifest = Path(cfg.partition) / "global" / f"{subset}.tsv"
        prefix = features / "global" / subset
        featurise([(manifest, prefix)], cfg.features, workers=cfg.workers, desc=f"{subset} features")
        feats = load_features(prefix, manifest, cfg.features)
        lines, usage, sse = label_lines(feats, codebook)
        write_label_file(
            out / "global" / f"{subset}.km", lines, read_manifest(manifest), extractor_for(cfg.features).frames
        )
        done[subset] = {
            "frames": feats.num_frames,
            "inertia": sse / max(feats.num_frames, 1),
            "labels": f"global/{subset}.km",
        }
        log.info("labelled held-out %s (%d frames) with the shared codebook", subset, feats.num_frames)
    return done


def _quality_sets(
    cfg: KMeansConfig, out: Path, clients: list[ClientPlace], heldout: list[str]
) -> list[tuple[str, list[tuple[Path, Path]], str | None]]:
    """(name, its (labels, manifest) files, the name of the training split it is compared with, or None for a
    training split) of every labelled split; training splits come first. Per-client codebooks: per client."""
    if cfg.mode == "per-client":
        return [
            (
                f"client_{p.index}/{split}",
                [(p.labels(split), p.manifest(split))],
                None if split == "train" else f"client_{p.index}/train",
            )
            for p in clients
            for split in SPLITS
        ]
    sets = [
        (split, [(p.labels(split), p.manifest(split)) for p in clients], None if split == "train" else "train")
        for split in SPLITS
    ]
    return sets + [
        (
            f"global/{subset}",
            [(out / "global" / f"{subset}.km", Path(cfg.partition) / "global" / f"{subset}.tsv")],
            "train",
        )
        for subset in heldout
    ]


def _label_quality(
    cfg: KMeansConfig, out: Path, clients: list[ClientPlace], heldout: list[str], simulation: bool
) -> dict:
    """kmeans.json's label_quality: per split, how much its labels encode the speaker (see labels/quality.py)."""
    sets = _quality_sets(cfg, out, clients, heldout)
    names = [name for name, _, _ in sets]
    if not simulation:
        return unavailable(
            names,
            "federation.superlink is set: the clients' label files are on the clients' "
            "machines, not on the one that writes kmeans.json",
        )
    splits: dict[str, dict] = {}
    usage: dict[str, np.ndarray] = {}
    try:
        for name, files, train in sets:
            counts: dict[int, np.ndarray] = {}
            for labels, manifest in files:
                add_counts(counts, read_speaker_counts(labels, manifest, cfg.num_clusters))
            splits[name] = split_quality(counts, cfg.num_clusters, None if train is None else usage[train])
            usage[name] = sum(counts.values(), np.zeros(cfg.num_clusters, dtype=np.int64))
    except SpeakerError as err:
        log.warning("no label quality in %s: %s", KMEANS_FILE, err)
        return unavailable(names, str(err))
    for name, _, train in sets:
        metrics = splits[name]
        if train is None and metrics["entropy_nats"] is not None:
            log.info(
                "label quality of %s: H(label) %.3f nats, I(label; speaker) %.3f nats (%.1f%% of it), %d of %d "
                "clusters dominated by one speaker",
                name,
                metrics["entropy_nats"],
                metrics["speaker_mi_nats"],
                100 * metrics["speaker_mi_share"],
                metrics["speaker_dominated_clusters"],
                metrics["clusters_used"],
            )
            warning = speaker_warning(name, metrics)
            if warning:
                log.warning(warning)
    return {"splits": splits, "reason": None}


def inertia_gap_text(relative_gap: float) -> str:
    """The federated codebook's inertia against the centralized one's, in words: `relative_gap` is
    federated / centralized - 1, and lower inertia is better."""
    if round(100 * relative_gap, 1) == 0:
        return "federated codebook inertia equal (to 0.1%) to the centralized codebook's"
    side = "below (better than)" if relative_gap < 0 else "above (worse than)"
    return f"federated codebook inertia {100 * abs(relative_gap):.1f}% {side} the centralized codebook's"


def kmeans_caption(record: dict) -> str:
    """What `kmeans_figure(record)` shows, for a caption."""
    left = (
        "inertia per Lloyd round"
        if record["history"]
        else "inertia of each client's codebook"
        + (" (histogram over clients)" if len(record["clients"]) > MANY_CLIENTS else "")
    )
    return f"k-means: {left}, and cluster usage"


def plot_kmeans(record: dict, path: Path) -> None:
    """Write `kmeans_figure` as a PNG at `path`."""
    save_figure(kmeans_figure(record), path)


def kmeans_figure(record: dict) -> Figure:
    """Inertia per Lloyd round (federated; integer ticks) or per client (per-client codebooks), and the share of
    frames per cluster."""
    fig, (ax_rounds, ax_usage) = plt.subplots(1, 2, figsize=(11, 4))
    if record["history"]:
        ax_rounds.plot([h["round"] for h in record["history"]], [h["inertia"] for h in record["history"]], marker="o")
        ax_rounds.set(xlabel="Lloyd round", ylabel="inertia per frame", title="federated k-means")
        integer_ticks(ax_rounds)
    elif len(record["clients"]) > MANY_CLIENTS:
        ax_rounds.hist([c["inertia"] for c in record["clients"]], bins=30)
        ax_rounds.set(
            xlabel="inertia per frame", ylabel="clients", title=f"per-client codebooks ({len(record['clients'])})"
        )
    else:
        inertia = [c["inertia"] for c in record["clients"]]
        ax_rounds.bar([str(c["client"]) for c in record["clients"]], inertia)
        ax_rounds.set(xlabel="client", ylabel="inertia per frame", title="per-client codebooks")
    usage = np.array(record["cluster_usage"], dtype=float)
    ax_usage.bar(np.arange(len(usage)), usage / usage.sum())
    ax_usage.set(xlabel="cluster", ylabel="share of frames", title=f"cluster usage (K={record['num_clusters']})")
    return fig


def run_kmeans(cfg: KMeansConfig, out: Path, run: StageRun) -> dict:
    out = Path(out).resolve()
    partition_file = Path(cfg.partition) / "partition.json"
    if not partition_file.is_file():
        raise CorpusError(f"{partition_file} not found: --partition must be a folder made by 'fedhubert partition'")
    partition = json.loads(partition_file.read_text())
    clients = [client_place(cfg, out, i) for i in range(int(partition["num_clients"]))]
    simulation = cfg.federation.superlink is None
    if simulation:  # all clients' data is on this machine: featurise it in parallel before the Flower run
        jobs = [(p.manifest(split), p.work / split) for p in clients for split in SPLITS]
        run.summary["features"] = featurise(jobs, cfg.features, workers=cfg.workers)
        for p in clients:  # the clients would fail in the Flower run; say so before starting it
            frames = load_features(p.work / "train", p.manifest("train"), cfg.features).num_frames
            size = sample_size(frames, cfg.sample_fraction, cfg.min_sample_frames)
            if size < cfg.num_clusters:
                raise KMeansError(
                    f"client {p.index} would fit its codebook on {size} frames (of its {frames}), fewer than "
                    f"num_clusters={cfg.num_clusters}: lower num_clusters, or raise sample_fraction or "
                    "min_sample_frames"
                )
    run_id = run_flower_app(
        {"task": "kmeans", "config": str(out / CONFIG_FILE), "out": str(out), "resume": run.resume},
        out,
        len(clients),
        cfg.federation,
        written=out / KMEANS_FILE,
    )
    record = json.loads((out / KMEANS_FILE).read_text())
    record["flower_run_id"] = run_id
    left_out = {int(failed["client"]) for failed in record["failed_clients"]}
    labelled = [p for p in clients if p.index not in left_out]
    if left_out:
        log.warning(
            "%d of %d clients were left out of k-means and have no labels (kmeans.json failed_clients); training "
            "never samples them",
            len(left_out),
            len(clients),
        )
    if cfg.mode == "federated":
        record["global"] = _label_heldout(cfg, partition, out, np.load(out / CODEBOOK_FILE))
    record["label_quality"] = _label_quality(cfg, out, labelled, list(record.get("global", {})), simulation)
    if cfg.reference and simulation:
        record["reference"] = _reference(cfg, labelled)
        ref = record["reference"]
        if cfg.mode == "federated":
            log.info(
                "inertia per frame: federated %.4f, centralized %.4f; %s",
                ref["federated_inertia"],
                ref["inertia"],
                inertia_gap_text(ref["relative_gap"]),
            )
        else:
            log.info(
                "per-client codebooks: mean distance to the matched centralized centroid %.3f (centroid spread %.3f)",
                ref["mean_matched_centroid_distance"],
                ref["centroid_scale"],
            )
    atomic_write_text(out / KMEANS_FILE, json.dumps(record, indent=2) + "\n")
    plot_kmeans(record, out / "kmeans.png")
    if record["unused_clusters"]:
        log.warning("%d of %d clusters label no frame", record["unused_clusters"], record["num_clusters"])
    log.info(
        "%s k-means, K=%d: inertia %.4f per frame over %d clients; labels in %s/client_<i>/{train,valid}.km",
        cfg.mode,
        cfg.num_clusters,
        record["inertia"],
        len(labelled),
        out,
    )
    run.summary.update({k: record[k] for k in ("mode", "num_clusters", "inertia", "rounds", "unused_clusters")})
    if "reference" in record:
        run.summary["reference"] = record["reference"]
    return record
