"""Federated k-means, the kmeans task of fedhubert's Flower app: the client handlers and the server's loop.

Federated mode: each client fits MiniBatchKMeans on a sample of its frames and shares the centroids that stand
for at least `lloyd.min_shared_count` frames, with their counts; the server clusters them (weighted) into the
initial codebook. Then, each round, clients return per-cluster sums, sums of squares and counts for the current
codebook, and the server recomputes the centroids, until the relative change in inertia is below `lloyd.tol`.
Finally clients label their own frames; labels never leave a client. The server checkpoints its state after every
Lloyd round (`checkpoints/round_<n>.pt`: centroids, RNG, history, the clients left out), so a killed run resumes
where it was.

At thousands of clients not every client takes part: the initial codebook comes from a seeded sample of at most
`lloyd.init_clients` clients, each Lloyd round asks `lloyd.fraction` of them, and a client that fails (an error, a
reply that does not pass its checks, no reply within the fitted timeout) is left out of the rest of the stage and
named in kmeans.json's `failed_clients`; training never samples a client without labels.

Per-client mode: each client fits its own codebook, keeps it (`client_<i>/codebook.npy`) and labels its frames.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedhubert.atomic import atomic_path, atomic_write_text
from fedhubert.config import config_to_dict, load_config
from fedhubert.fl.exchange import FittedTimeout, Stragglers, client_error, exchange, message_ttl, send_window
from fedhubert.fl.nodes import connect_clients, in_simulation, served_client
from fedhubert.fl.place import ClientPlace
from fedhubert.fl.records import MessageLog, arrays, config_from_record, config_to_record, numpy_arrays
from fedhubert.fl.rounds import (
    CHECKPOINTS,
    changed_keys,
    newest_checkpoint,
    prune_round_checkpoints,
    round_checkpoint,
)
from fedhubert.fl.tasks import FederatedTask, ServerRun
from fedhubert.fl.training import client_seconds
from fedhubert.labels.config import KMeansConfig
from fedhubert.labels.features import FeatureSet, extractor_for, featurise, load_features
from fedhubert.labels.kmeans import (
    KMeansError,
    StatsSum,
    centred,
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
LLOYD_KEEP = 3  # Lloyd checkpoints kept (each is K x D floats and the state)


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
    dsums, dsumsq = centred(stats, centroids)
    return _reply(
        message,
        {"client": place.index, "inertia": stats.inertia, "frames": stats.frames},
        centred_sums=dsums,
        centred_sumsq=dsumsq,
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
def _arrays_of(content: RecordDict, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    if "stats" not in content or "metrics" not in content:
        raise KMeansError("the reply lacks 'stats' or 'metrics'")
    got = numpy_arrays(content["stats"])
    missing = [name for name in names if name not in got]
    if missing:
        raise KMeansError(f"the reply lacks {', '.join(missing)}")
    for name in names:
        if not np.all(np.isfinite(got[name])):
            raise KMeansError(f"{name} holds values that are not finite")
    return got


def _check_init(content: RecordDict, cfg: KMeansConfig) -> None:
    got = _arrays_of(content, ("centroids", "counts"))
    centroids, counts = got["centroids"], got["counts"]
    dims = extractor_for(cfg.features).dims
    if centroids.ndim != 2 or centroids.shape[1] != dims or len(centroids) > cfg.num_clusters:
        raise KMeansError(f"centroids of shape {centroids.shape}, not (at most {cfg.num_clusters}, {dims})")
    if counts.shape != (len(centroids),) or np.any(counts < 0):
        raise KMeansError(f"counts of shape {counts.shape} (or negative) for {len(centroids)} centroids")


def _check_stats(content: RecordDict, cfg: KMeansConfig, centroids: np.ndarray) -> None:
    got = _arrays_of(content, ("centred_sums", "centred_sumsq", "counts"))
    for name, shape in (
        ("centred_sums", centroids.shape),
        ("centred_sumsq", centroids.shape),
        ("counts", (len(centroids),)),
    ):
        if got[name].shape != shape:
            raise KMeansError(f"{name} of shape {got[name].shape}, not {shape}")
    metrics = content["metrics"]
    inertia, frames = float(metrics.get("inertia", np.nan)), int(metrics.get("frames", -1))
    if not np.isfinite(inertia) or inertia < 0 or frames != int(got["counts"].sum()) or np.any(got["counts"] < 0):
        raise KMeansError(f"inertia {inertia} or frames {frames} do not match its counts ({int(got['counts'].sum())})")


def _check_labels(content: RecordDict, cfg: KMeansConfig) -> None:
    usage = _arrays_of(content, ("usage",))["usage"]
    if usage.shape != (cfg.num_clusters,):
        raise KMeansError(f"usage of shape {usage.shape}, not ({cfg.num_clusters},)")
    if "manifests" not in content or any(f"{split}_frames" not in content["metrics"] for split in SPLITS):
        raise KMeansError("the reply lacks its manifests' hashes or frame counts")


class _Server:
    """The server's side of the stage: which clients are still in it, and one exchange with a sample of them.
    A client whose reply is an error, does not pass its checks or does not come in time is left out of the rest
    of the stage (it gets no labels, so training never samples it); the stage stops once fewer than
    `lloyd.min_clients` are left."""

    def __init__(self, grid: Grid, cfg: KMeansConfig, out: Path, partition: dict):
        self.grid = grid
        self.cfg = cfg
        self.out = out
        self.num_clients = int(partition["num_clients"])
        self.seconds = client_seconds(partition)
        self.messages = MessageLog(out / "messages.jsonl")
        self.failed: dict[int, dict] = {}  # client -> {"stage", "round", "reason"}
        self.timeouts: dict[str, FittedTimeout] = {}
        self.stragglers = Stragglers()
        self.exchange_seconds: dict[str, float] = {}  # by action, over the stage
        federation = cfg.federation
        self.clients = connect_clients(
            grid,
            self.num_clients,
            federation.virtual(in_simulation(grid)),
            federation.connect_timeout_s,
            None,
            pool=federation.supernodes,
            least=min(cfg.lloyd.min_clients, self.num_clients),
        )
        for client in self.clients.missing():
            self.failed[client] = {
                "stage": "connect",
                "round": None,
                "reason": f"its SuperNode did not connect within {federation.connect_timeout_s:.0f} s",
            }

    def active(self) -> list[int]:
        return [client for client in range(self.num_clients) if client not in self.failed]

    def sample(self, round_: int, share: float = 1.0, most: int | None = None) -> list[int]:
        """A seeded sample (by seed and round) of `share` of the clients still in the stage, at most `most`."""
        active = self.active()
        size = min(len(active), max(1, math.ceil(share * len(active))), most or len(active))
        if size == len(active):
            return active
        rng = np.random.default_rng([self.cfg.seed, round_])
        return sorted(int(c) for c in rng.choice(active, size=size, replace=False))

    def _fail(self, client: int, action: str, round_: int | None, reason: str) -> None:
        self.failed[client] = {"stage": action, "round": round_, "reason": reason}
        log.warning("k-means %s: client %d is left out of the rest of the stage: %s", action, client, reason)

    def ask(
        self,
        action: str,
        clients: list[int],
        round_: int | None = None,
        check: Callable[[RecordDict], None] | None = None,
        fold: Callable[[int, RecordDict], None] | None = None,
        **records,
    ) -> dict[int, RecordDict]:
        """Send `action` with the config (and `records`) to `clients`; return the replies that passed `check`,
        by client index. With `fold`, each such reply is handed to it as it arrives and only its metrics are kept."""
        outgoing = []
        config = config_to_record(self.cfg)
        plan = self.clients.assign(clients, self.seconds)
        timeout = self.timeouts.setdefault(action, FittedTimeout(self.cfg.lloyd.timeout_s))
        wait_s = timeout.seconds()
        for client, node in plan:
            run = {"out": str(self.out), **({"client": client} if self.clients.virtual else {})}
            content = RecordDict({"config": config, "run": ConfigRecord(run), **records})
            message = Message(
                content,
                dst_node_id=node,
                message_type=f"query.{action}",
                group_id=str(round_ if round_ is not None else action),
                ttl=message_ttl(wait_s),
            )
            self.messages.record("to_client", message, round_, client)
            outgoing.append((client, message))
        replies: dict[int, RecordDict] = {}

        def take(client: int, reply: Message) -> None:
            self.messages.record("from_client", reply, round_, client)
            if reply.has_error():
                self._fail(
                    client, action, round_, f"client error (node {reply.metadata.src_node_id}): {client_error(reply)}"
                )
                return
            try:
                said = int(reply.content["metrics"]["client"])
                if said != client:
                    raise KMeansError(f"the reply for client {client} came from client {said}")
                if check is not None:
                    check(reply.content)
            except (KMeansError, KeyError, TypeError, ValueError) as err:
                self._fail(client, action, round_, f"rejected reply: {err}")
                return
            if fold is None:
                replies[client] = reply.content
            else:
                fold(client, reply.content)
                replies[client] = RecordDict({"metrics": reply.content["metrics"]})

        window = send_window(len({node for _, node in plan}))
        started = time.monotonic()
        done = exchange(
            self.grid,
            outgoing,
            take,
            timeout_s=wait_s,
            label=f"k-means {action}",
            window=window,
            stragglers=self.stragglers,
        )
        self.exchange_seconds[action] = self.exchange_seconds.get(action, 0.0) + time.monotonic() - started
        timeout.observe(done)
        for client in done.missing:
            self._fail(client, action, round_, f"no reply within {wait_s:.0f} s")
        left = len(self.active())
        if not replies or left < self.cfg.lloyd.min_clients:
            raise KMeansError(
                f"k-means {action}: {len(replies)} of {len(clients)} clients replied and {left} are left in the "
                f"stage (lloyd.min_clients={self.cfg.lloyd.min_clients}); see the warnings above for why"
            )
        return replies


def sampling_error(inertia: np.ndarray, frames: np.ndarray) -> float:
    """The relative standard error of a round's inertia per frame (sum of inertias / sum of frames, a ratio
    estimator over the sampled clients, given each client's inertia and frames) as an estimate of the same ratio over
    all clients: the spread of the clients' inertia per frame, weighted by their frames, over sqrt(n). 0 for fewer
    than 2 clients."""
    if len(inertia) < 2:
        return 0.0
    inertia, frames = np.asarray(inertia, dtype=np.float64), np.asarray(frames, dtype=np.float64)
    ratio = inertia.sum() / frames.sum()
    residual = inertia - ratio * frames
    se = np.sqrt(np.sum(residual**2) / (len(inertia) * (len(inertia) - 1))) / frames.mean()
    return float(se / ratio) if ratio > 0 else 0.0


def _save_lloyd(
    out: Path,
    round_: int,
    centroids: np.ndarray,
    seen: np.ndarray | None,
    rng: np.random.Generator,
    history: list,
    progress: dict,
    converged: bool,
    cfg: KMeansConfig,
    failed: dict[int, dict],
) -> None:
    """The server's whole state after a Lloyd round (round 0: the initial codebook), so a killed run resumes it;
    only the newest LLOYD_KEEP are kept."""
    tensors = {"centroids": torch.from_numpy(np.ascontiguousarray(centroids))}
    if seen is not None:
        tensors["seen"] = torch.from_numpy(seen.copy())
    save_checkpoint(
        round_checkpoint(out, round_),
        kind=LLOYD_KIND,
        model={"num_clusters": len(centroids), "dims": int(centroids.shape[1])},
        num_classes=len(centroids),
        state_dict=tensors,
        state={
            "round": round_,
            "rng": rng.bit_generator.state,
            "history": history,
            "progress": dict(progress),
            "converged": bool(converged),
            "failed": {str(client): why for client, why in failed.items()},
            "config": config_to_dict(cfg),
        },
    )
    prune_round_checkpoints(out, LLOYD_KEEP)


def _restore_lloyd(
    out: Path, cfg: KMeansConfig, rng: np.random.Generator, server: _Server
) -> tuple[int, np.ndarray, np.ndarray | None, list, dict, bool] | None:
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
    server.failed.update({int(client): why for client, why in state.get("failed", {}).items()})
    log.info("resuming federated k-means after Lloyd round %d (%s)", state["round"], path.name)
    tensors = payload["state_dict"]
    return (
        int(state["round"]),
        tensors["centroids"].numpy(),
        tensors["seen"].numpy().copy() if "seen" in tensors else None,
        list(state["history"]),
        dict(state["progress"]),
        bool(state["converged"]),
    )


def _initial(server: _Server, cfg: KMeansConfig) -> np.ndarray:
    """The initial codebook from the shared local centroids of a sample of at most `lloyd.init_clients` clients."""
    asked = server.sample(0, most=cfg.lloyd.init_clients)
    replies = server.ask("kmeans_init", asked, 0, lambda content: _check_init(content, cfg))
    local = [
        (numpy_arrays(r["stats"])["centroids"], numpy_arrays(r["stats"])["counts"]) for _, r in sorted(replies.items())
    ]
    centroids = initial_codebook(local, cfg.num_clusters, cfg.seed)
    log.info(
        "initial codebook from %d shared local centroids of %d clients (of %d)",
        sum(len(c) for c, _ in local),
        len(replies),
        server.num_clients,
    )
    return centroids


def _lloyd(server: _Server, cfg: KMeansConfig, out: Path, resume: bool) -> tuple[np.ndarray, list]:
    """The federated codebook: initial centroids from a sample of the clients' local ones, then Lloyd rounds on the
    statistics of `lloyd.fraction` of the clients each. Every round is checkpointed; `resume` continues from the
    newest readable checkpoint. With every client asked, the rounds stop once the inertia changes by less than
    `lloyd.tol`. With a sample per round the inertia is an estimate whose noise (a one-speaker client's inertia per
    frame varies with its voice) swamps any tol, so the rounds are mini-batch k-means and stop as scikit-learn's
    MiniBatchKMeans does: once the smoothed inertia has not improved for `lloyd.patience` rounds."""
    rng = np.random.default_rng(cfg.seed)
    sampled = cfg.lloyd.fraction < 1
    restored = _restore_lloyd(out, cfg, rng, server) if resume else None
    if restored is None:
        centroids = _initial(server, cfg)
        start, history, converged = 0, [], False
        seen = np.zeros(len(centroids)) if sampled else None
        progress: dict = {"previous": None, "smoothed": None, "best": None, "stale": 0}
        _save_lloyd(out, 0, centroids, seen, rng, history, progress, converged, cfg, server.failed)
    else:
        start, centroids, seen, history, progress, converged = restored
    clock = RoundClock(start + 1, cfg.lloyd.max_rounds)
    for round_ in range(start + 1, cfg.lloyd.max_rounds + 1):
        if converged:
            break
        asked = server.sample(round_, cfg.lloyd.fraction)
        round_started = time.monotonic()
        sent = centroids.astype(np.float32)
        summed = StatsSum(sent)
        server.ask(
            "kmeans_stats",
            asked,
            round_,
            lambda content, sent=sent: _check_stats(content, cfg, sent),
            fold=lambda client, content, summed=summed: summed.add(
                client, **numpy_arrays(content["stats"]), inertia=float(content["metrics"]["inertia"])
            ),
            codebook=arrays(centroids=sent),
        )
        stats = summed.total()
        inertia = stats.inertia / stats.frames
        unseen = 1 - len(summed) / max(len(server.active()), len(summed))  # the finite-population correction
        noise = float(sampling_error(*summed.per_client()) * np.sqrt(unseen))  # numpy scalars fail weights_only loads
        centroids, reseeded = lloyd_update([stats], centroids, rng, seen)
        previous = progress["previous"]
        change = abs(previous - inertia) / previous if previous else float("inf")
        row = {
            "round": round_,
            "inertia": inertia,
            "relative_change": change,
            "sampling_noise": noise,
            "clients": len(summed),
            "reseeded": reseeded,
        }
        progress["previous"] = inertia
        if sampled:
            converged = _no_longer_improving(progress, inertia, len(summed) / max(len(server.active()), 1), cfg)
            row["smoothed_inertia"] = progress["smoothed"]
        else:
            converged = change < cfg.lloyd.tol and not reseeded
        history.append(row | {"seconds": round(time.monotonic() - round_started, 3)})
        log.info(
            "k-means round %d/%d (%s): inertia %.4f per frame over %d clients (%s), %d clusters re-seeded",
            round_,
            cfg.lloyd.max_rounds,
            clock.status(round_, bound=True),
            inertia,
            len(summed),
            f"smoothed {progress['smoothed']:.4f}, {progress['stale']} of {cfg.lloyd.patience} rounds without "
            f"improvement, sampling noise {noise:.1e}"
            if sampled
            else f"change {change:.2e}",
            len(reseeded),
        )
        _save_lloyd(out, round_, centroids, seen, rng, history, progress, converged, cfg, server.failed)
    return centroids.astype(np.float32), history


def _no_longer_improving(progress: dict, inertia: float, share: float, cfg: KMeansConfig) -> bool:
    """MiniBatchKMeans's stopping rule on the rounds' sampled inertias: an exponentially weighted mean with weight
    2 x the sampled share, and a count of rounds in which it did not fall below the best by a relative tol."""
    alpha = min(1.0, 2 * share)
    smoothed = inertia if progress["smoothed"] is None else (1 - alpha) * progress["smoothed"] + alpha * inertia
    progress["smoothed"] = float(smoothed)
    if progress["best"] is None or smoothed < progress["best"] * (1 - cfg.lloyd.tol):
        progress["best"], progress["stale"] = float(smoothed), 0
    else:
        progress["stale"] += 1
    return progress["stale"] >= cfg.lloyd.patience


def serve_kmeans(grid: Grid, run: ServerRun) -> None:
    cfg, out = load_config(KMeansConfig, run.config), run.out
    partition = json.loads((Path(cfg.partition) / "partition.json").read_text())
    server = _Server(grid, cfg, out, partition)
    started = time.monotonic()
    history: list[dict] = []
    if cfg.mode == "per-client":
        replies = server.ask("kmeans_own_codebook", server.active(), check=lambda content: _check_labels(content, cfg))
    else:
        codebook, history = _lloyd(server, cfg, out, run.resume)
        with atomic_path(out / CODEBOOK_FILE) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, codebook)
        replies = server.ask(
            "kmeans_labels",
            server.active(),
            check=lambda content: _check_labels(content, cfg),
            codebook=arrays(centroids=codebook),
        )
    write_record(cfg, out, partition, replies, history, time.monotonic() - started, server)


def write_record(
    cfg: KMeansConfig,
    out: Path,
    partition: dict,
    replies: dict[int, RecordDict],
    history: list,
    seconds: float,
    server: _Server,
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
        "failed_clients": [{"client": client, **server.failed[client]} for client in sorted(server.failed)],
        "partition": {"path": str(cfg.partition), "scheme": partition["scheme"], "seed": partition["seed"]},
        "seconds": round(seconds, 2),
        "exchange_seconds": {action: round(s, 2) for action, s in server.exchange_seconds.items()},
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
