"""Federated k-means, the kmeans task of fedhubert's Flower app: the client handlers and the server's loop.

Federated mode: each client fits MiniBatchKMeans on a sample of its frames and shares the centroids that stand
for at least `lloyd.min_shared_count` frames, with their counts; the server clusters them (weighted) into the
initial codebook. Then, each round, clients return per-cluster sums, sums of squares and counts for the current
codebook, and the server recomputes the centroids, until the relative change in inertia is below `lloyd.tol`.
Finally clients label their own frames; labels never leave a client. The server checkpoints its state after every
Lloyd round (`checkpoints/round_<n>.pt`: centroids, RNG, history), so a killed run resumes where it was.

Per-client mode: each client fits its own codebook, keeps it (`client_<i>/codebook.npy`) and labels its frames.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedhubert.atomic import atomic_path, atomic_write_text
from fedhubert.config import config_to_dict, load_config
from fedhubert.fl.exchange import exchange
from fedhubert.fl.nodes import connect_clients, served_client
from fedhubert.fl.place import ClientPlace
from fedhubert.fl.records import MessageLog, arrays, config_from_record, config_to_record, numpy_arrays
from fedhubert.fl.rounds import CHECKPOINTS, changed_keys, newest_checkpoint, round_checkpoint
from fedhubert.fl.tasks import FederatedTask, ServerRun
from fedhubert.fl.training import client_seconds
from fedhubert.labels.config import KMeansConfig
from fedhubert.labels.features import FeatureSet, extractor_for, featurise, load_features
from fedhubert.labels.kmeans import (
    ClusterStats,
    KMeansError,
    cluster_stats,
    fit_minibatch,
    initial_codebook,
    label_lines,
    lloyd_update,
    sample_frames,
    write_label_file,
)
from fedhubert.manifest import file_sha256, read_manifest
from fedhubert.model.checkpoint import save_checkpoint
from fedhubert.runlog import RoundClock

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")
KMEANS_FILE = "kmeans.json"
CODEBOOK_FILE = "codebook.npy"
LLOYD_KIND = "kmeans-lloyd"


# ------------------------------------------------------------------------------------------------ client side
def _client_setup(message: Message, context: Context) -> tuple[KMeansConfig, ClientPlace]:
    """The config and where this client's files are: the run's output folder (or the node config's `work-dir`)
    takes the labels, and its features go to `feature_dir` or `<out>/features`, per client."""
    cfg = config_from_record(KMeansConfig, message.content["config"])
    run = message.content["run"]
    node = context.node_config
    out = Path(str(node.get("work-dir", run["out"])))
    index, _ = served_client(message, context, "run")
    return cfg, client_place(cfg, out, index, Path(str(node.get("partition-dir", cfg.partition))))


def client_place(cfg: KMeansConfig, out: Path, index: int, partition: Path | None = None) -> ClientPlace:
    """Where client `index` of a k-means run into `out` reads its manifests and writes its features and labels."""
    features = Path(cfg.feature_dir) if cfg.feature_dir else out / "features"
    return ClientPlace(index, partition or Path(cfg.partition), out, features / f"client_{index}")


def _features(cfg: KMeansConfig, place: ClientPlace, split: str) -> FeatureSet:
    """This client's features, computed here if the stage did not compute them already (deployment). Both splits
    at once: under features.normalize=speaker a speaker's statistics pool over them."""
    featurise([(place.manifest(s), place.work / s) for s in SPLITS], cfg.features, workers=1)
    return load_features(place.work / split, place.manifest(split), cfg.features)


def _reply(message: Message, metrics: dict, **named: np.ndarray) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if named:
        content["stats"] = arrays(**named)
    return Message(content, reply_to=message)


def _fit_local(cfg: KMeansConfig, place: ClientPlace, feats: FeatureSet):
    rng = np.random.default_rng([cfg.seed, place.index])
    sample = sample_frames(feats.feats, cfg.sample_fraction, cfg.min_sample_frames, rng)
    model = fit_minibatch(
        sample, cfg.num_clusters, cfg.minibatch, cfg.seed + place.index, f"client {place.index} ({feats.name})"
    )
    return model, len(sample)


def client_init(message: Message, context: Context) -> Message:
    cfg, place = _client_setup(message, context)
    feats = _features(cfg, place, "train")
    model, sampled = _fit_local(cfg, place, feats)
    counts = np.bincount(model.labels_, minlength=cfg.num_clusters)
    shared = counts >= cfg.lloyd.min_shared_count
    return _reply(
        message,
        {
            "client": place.index,
            "frames": feats.num_frames,
            "sample_frames": sampled,
            "shared_centroids": int(shared.sum()),
        },
        centroids=model.cluster_centers_[shared].astype(np.float32),
        counts=counts[shared].astype(np.int64),
    )


def client_stats(message: Message, context: Context) -> Message:
    cfg, place = _client_setup(message, context)
    centroids = numpy_arrays(message.content["codebook"])["centroids"]
    stats = cluster_stats(_features(cfg, place, "train"), centroids)
    return _reply(
        message,
        {"client": place.index, "inertia": stats.inertia, "frames": stats.frames},
        sums=stats.sums,
        sumsq=stats.sumsq,
        counts=stats.counts,
    )


def _label(cfg: KMeansConfig, place: ClientPlace, centroids: np.ndarray) -> tuple[dict, np.ndarray]:
    metrics: dict = {"client": place.index}
    usage = np.zeros(len(centroids), dtype=np.int64)
    for split in SPLITS:
        feats = _features(cfg, place, split)
        lines, split_usage, sse = label_lines(feats, centroids)
        write_label_file(
            place.labels(split), lines, read_manifest(place.manifest(split)), extractor_for(cfg.features).frames
        )
        usage += split_usage
        metrics[f"{split}_frames"] = feats.num_frames
        metrics[f"{split}_sse"] = sse
    return metrics, usage


def client_labels(message: Message, context: Context) -> Message:
    cfg, place = _client_setup(message, context)
    metrics, usage = _label(cfg, place, numpy_arrays(message.content["codebook"])["centroids"])
    reply = _reply(message, metrics, usage=usage)
    reply.content["manifests"] = _manifest_hashes(place)
    return reply


def client_own_codebook(message: Message, context: Context) -> Message:
    """Per-client mode: fit, keep and use this client's own codebook."""
    cfg, place = _client_setup(message, context)
    model, sampled = _fit_local(cfg, place, _features(cfg, place, "train"))
    centroids = model.cluster_centers_.astype(np.float32)
    with atomic_path(place.kmeans / place.folder / CODEBOOK_FILE) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, centroids)
    metrics, usage = _label(cfg, place, centroids)
    metrics["sample_frames"] = sampled
    reply = _reply(message, metrics, usage=usage)
    reply.content["manifests"] = _manifest_hashes(place)
    return reply


def _manifest_hashes(place: ClientPlace) -> ConfigRecord:
    return ConfigRecord({f"{split}.tsv": file_sha256(place.manifest(split)) for split in SPLITS})


# ------------------------------------------------------------------------------------------------ server side
class _Server:
    def __init__(self, grid: Grid, cfg: KMeansConfig, out: Path, partition: dict):
        self.grid = grid
        self.cfg = cfg
        self.out = out
        self.num_clients = int(partition["num_clients"])
        self.seconds = client_seconds(partition)
        self.messages = MessageLog(out / "messages.jsonl")
        federation = cfg.federation
        self.clients = connect_clients(
            grid, self.num_clients, federation.virtual(), federation.connect_timeout_s, None, pool=federation.supernodes
        )

    def ask(self, action: str, round_: int | None = None, **records) -> dict[int, RecordDict]:
        """Send `action` with the config (and `records`) to every client; return the replies by client index."""
        outgoing = []
        config = config_to_record(self.cfg)
        plan = self.clients.assign(range(self.num_clients), self.seconds)
        for client, node in plan:
            run = {"out": str(self.out), **({"client": client} if self.clients.virtual else {})}
            content = RecordDict({"config": config, "run": ConfigRecord(run), **records})
            message = Message(
                content,
                dst_node_id=node,
                message_type=f"query.{action}",
                group_id=str(round_ if round_ is not None else action),
            )
            self.messages.record("to_client", message, round_, client)
            outgoing.append((client, message))
        replies: dict[int, RecordDict] = {}

        def take(client: int, reply: Message) -> None:
            self.messages.record("from_client", reply, round_, client)
            if reply.has_error():
                raise KMeansError(
                    f"client {client} (node {reply.metadata.src_node_id}) failed in {action}: {reply.error.reason}"
                )
            said = int(reply.content["metrics"]["client"])
            if said != client:
                raise KMeansError(f"{action}: the reply for client {client} came from client {said}")
            replies[client] = reply.content

        # A few messages in flight per node: Flower's simulation dispatcher scans every stored message for each node.
        window = max(16, 4 * len({node for _, node in plan}))
        exchange(self.grid, outgoing, take, timeout_s=None, label=f"k-means {action}", window=window)
        return replies


def _save_lloyd(
    out: Path,
    round_: int,
    centroids: np.ndarray,
    rng: np.random.Generator,
    history: list,
    previous: float | None,
    converged: bool,
    cfg: KMeansConfig,
) -> None:
    """The server's whole state after a Lloyd round (round 0: the initial codebook), so a killed run resumes it."""
    save_checkpoint(
        round_checkpoint(out, round_),
        kind=LLOYD_KIND,
        model={"num_clusters": len(centroids), "dims": int(centroids.shape[1])},
        num_classes=len(centroids),
        state_dict={"centroids": torch.from_numpy(np.ascontiguousarray(centroids))},
        state={
            "round": round_,
            "rng": rng.bit_generator.state,
            "history": history,
            "previous": previous,
            "converged": converged,
            "config": config_to_dict(cfg),
        },
    )


def _restore_lloyd(
    out: Path, cfg: KMeansConfig, rng: np.random.Generator
) -> tuple[int, np.ndarray, list, float | None, bool] | None:
    found = newest_checkpoint(out, LLOYD_KIND)
    if found is None:
        log.warning("no Lloyd checkpoint to resume from in %s; starting from the initial codebook", out / CHECKPOINTS)
        return None
    path, payload = found
    state = payload["state"]
    changed = changed_keys(state["config"], config_to_dict(cfg), ("federation",))
    if changed:
        raise KMeansError(
            f"{path} was written with other settings ({', '.join(changed)}); resume with the run's own config.yaml"
        )
    rng.bit_generator.state = state["rng"]
    log.info("resuming federated k-means after Lloyd round %d (%s)", state["round"], path.name)
    return (
        int(state["round"]),
        payload["state_dict"]["centroids"].numpy(),
        list(state["history"]),
        state["previous"],
        bool(state["converged"]),
    )


def _lloyd(server: _Server, cfg: KMeansConfig, out: Path, resume: bool) -> tuple[np.ndarray, list]:
    """The federated codebook: initial centroids from the clients' local ones, then Lloyd rounds on their statistics.
    Every round is checkpointed; `resume` continues from the newest readable checkpoint."""
    rng = np.random.default_rng(cfg.seed)
    restored = _restore_lloyd(out, cfg, rng) if resume else None
    if restored is None:
        replies_init = server.ask("kmeans_init")
        local = [
            (numpy_arrays(r["stats"])["centroids"], numpy_arrays(r["stats"])["counts"])
            for _, r in sorted(replies_init.items())
        ]
        centroids = initial_codebook(local, cfg.num_clusters, cfg.seed)
        log.info("initial codebook from %d shared local centroids", sum(len(c) for c, _ in local))
        start, history, previous, converged = 0, [], None, False
        _save_lloyd(out, 0, centroids, rng, history, previous, converged, cfg)
    else:
        start, centroids, history, previous, converged = restored
    clock = RoundClock(start + 1, cfg.lloyd.max_rounds)
    for round_ in range(start + 1, cfg.lloyd.max_rounds + 1):
        if converged:
            break
        replies_stats = server.ask("kmeans_stats", round_, codebook=arrays(centroids=centroids.astype(np.float32)))
        stats = [
            ClusterStats(
                **{k: v for k, v in numpy_arrays(r["stats"]).items()},
                inertia=float(r["metrics"]["inertia"]),
                frames=int(r["metrics"]["frames"]),
            )
            for _, r in sorted(replies_stats.items())
        ]
        inertia = sum(s.inertia for s in stats) / sum(s.frames for s in stats)
        centroids, reseeded = lloyd_update(stats, centroids, rng)
        change = abs(previous - inertia) / previous if previous else float("inf")
        history.append({"round": round_, "inertia": inertia, "relative_change": change, "reseeded": reseeded})
        log.info(
            "k-means round %d/%d (%s): inertia %.4f per frame (change %.2e), %d clusters re-seeded",
            round_,
            cfg.lloyd.max_rounds,
            clock.status(round_, bound=True),
            inertia,
            change,
            len(reseeded),
        )
        previous = inertia
        converged = change < cfg.lloyd.tol and not reseeded
        _save_lloyd(out, round_, centroids, rng, history, previous, converged, cfg)
    return centroids.astype(np.float32), history


def serve_kmeans(grid: Grid, run: ServerRun) -> None:
    cfg, out = load_config(KMeansConfig, run.config), run.out
    partition = json.loads((Path(cfg.partition) / "partition.json").read_text())
    server = _Server(grid, cfg, out, partition)
    started = time.monotonic()
    history: list[dict] = []
    if cfg.mode == "per-client":
        replies = server.ask("kmeans_own_codebook")
    else:
        codebook, history = _lloyd(server, cfg, out, run.resume)
        with atomic_path(out / CODEBOOK_FILE) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, codebook)
        replies = server.ask("kmeans_labels", codebook=arrays(centroids=codebook))
    write_record(cfg, out, partition, replies, history, time.monotonic() - started)


def write_record(
    cfg: KMeansConfig, out: Path, partition: dict, replies: dict[int, RecordDict], history: list, seconds: float
) -> dict:
    clients, usage_total = [], np.zeros(cfg.num_clusters, dtype=np.int64)
    for index, content in sorted(replies.items()):
        m = content["metrics"]
        usage = numpy_arrays(content["stats"])["usage"]
        usage_total += usage
        frames = int(m["train_frames"]) + int(m["valid_frames"])
        clients.append(
            {
                "client": index,
                "frames": {split: int(m[f"{split}_frames"]) for split in SPLITS},
                "inertia": (float(m["train_sse"]) + float(m["valid_sse"])) / max(frames, 1),
                "cluster_usage": usage.tolist(),
                "unused_clusters": int(np.sum(usage == 0)),
                "manifests": dict(content["manifests"]),
                "labels": {f"{split}.km": file_sha256(out / f"client_{index}" / f"{split}.km") for split in SPLITS},
                **({"codebook": f"client_{index}/{CODEBOOK_FILE}"} if cfg.mode == "per-client" else {}),
            }
        )
    frames = sum(sum(c["frames"].values()) for c in clients)
    extractor = extractor_for(cfg.features)
    record = {
        "mode": cfg.mode,
        "label_head": "local" if cfg.mode == "per-client" else "shared",
        "num_clusters": cfg.num_clusters,
        "label_rate": extractor.label_rate,
        "features": {**extractor.meta(), "checkpoint": extractor.checkpoint},
        "codebook": CODEBOOK_FILE if cfg.mode == "federated" else None,
        "rounds": len(history),
        "history": history,
        "inertia": sum(c["inertia"] * sum(c["frames"].values()) for c in clients) / max(frames, 1),
        "cluster_usage": usage_total.tolist(),
        "unused_clusters": int(np.sum(usage_total == 0)),
        "clients": clients,
        "partition": {"path": str(cfg.partition), "scheme": partition["scheme"], "seed": partition["seed"]},
        "seconds": round(seconds, 2),
        "config": config_to_dict(cfg),
    }
    atomic_write_text(out / KMEANS_FILE, json.dumps(record, indent=2) + "\n")
    return record


TASK = FederatedTask(
    "kmeans",
    serve_kmeans,
    {
        "query.kmeans_init": client_init,
        "query.kmeans_stats": client_stats,
        "query.kmeans_labels": client_labels,
        "query.kmeans_own_codebook": client_own_codebook,
    },
)
