"""What a client of a federated training task keeps on its side: where its data is, its own overrides, its
parsed data (cached across rounds in the client process), its local label head, and its seeds.

A client is its node's partition id. It reads `client_<i>/train.tsv` and `valid.tsv` of the partition, its labels
from the k-means run, and its overrides from the partition's `client_configs/client_<i>.yaml` (only
`local_steps` and `train.*`). With `transfer=bfloat16` a client replies with its change (trained - received),
not its weights. A label head that stays local lives in its own folder
(`clients/client_<i>/head_round_<r>.pt`) and never leaves it. Crops, masks and dropout are seeded by (seed,
round, client), so a round's result does not depend on which process runs it or on what ran before.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedhubert.atomic import atomic_write_bytes
from fedhubert.config import layer_file
from fedhubert.fl.config import RoundsConfig
from fedhubert.fl.nodes import served_client
from fedhubert.fl.place import ClientPlace
from fedhubert.train.data import DataError, LabelRate, load_utterances

T = TypeVar("T")
R = TypeVar("R", bound=RoundsConfig)
_HEAD = re.compile(r"head_round_(\d+)\.pt")
# Keys a client_configs/client_<i>.yaml may set for its client: how it trains, not what the federation learns.
CLIENT_KEYS = ("local_steps", "train")


def client_place(
    cfg: RoundsConfig, out: Path, context: Context, index: int, virtual: bool, with_labels: bool = True
) -> ClientPlace:
    """Where client `index`'s data is: the run's paths, unless the node config says otherwise (deployments:
    `partition-dir`, `kmeans-dir`, and `work-dir`, which is the client's own folder, or with virtual clients the
    folder that holds every served client's `client_<i>`)."""
    node = context.node_config
    kmeans = node.get("kmeans-dir", cfg.kmeans) if with_labels else None
    work = out / "clients" / f"client_{index}"
    if "work-dir" in node:
        work = Path(str(node["work-dir"])) / (f"client_{index}" if virtual else "")
    return ClientPlace(
        index=index,
        partition=Path(str(node.get("partition-dir", cfg.partition))),
        kmeans=Path(str(kmeans)) if kmeans else None,
        work=work,
    )


def with_client_overrides(cfg: T, place: ClientPlace) -> T:
    """`cfg` with this client's `client_configs/client_<i>.yaml` of the partition laid over it, when there is one
    that sets something (the partitioner writes an empty one, `{}`, for every client)."""
    path = place.partition / "client_configs" / f"client_{place.index}.yaml"
    try:
        stat = path.stat()
    except OSError:
        return cfg
    if _sets_nothing(str(path), stat.st_mtime_ns, stat.st_size):
        return cfg
    return layer_file(cfg, path, CLIENT_KEYS)


@functools.lru_cache(maxsize=8192)
def _sets_nothing(path: str, mtime_ns: int, size: int) -> bool:
    """Whether the override file (as of this modification time and size) is empty or `{}`; one that does not parse
    is left to `layer_file`, whose error names it."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8")) in (None, {})
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False


def client_configs(cfg: R, num_clients: int) -> list[R]:
    """Every client's config: `cfg` with the client's overrides laid over it (read from the partition's
    client_configs where this machine has them); a bad override file fails here."""
    partition = Path(cfg.partition)
    return [with_client_overrides(cfg, ClientPlace(i, partition, None, Path("."))) for i in range(num_clients)]


def planned_local_steps(cfg: RoundsConfig, num_clients: int) -> int:
    """The most updates a client runs per round: the config's `local_steps`, or a client override's when larger."""
    return max([cfg.local_steps, *(c.local_steps for c in client_configs(cfg, num_clients))])


@dataclass(frozen=True)
class _Parse:
    """One parse of a manifest and its labels. Two are equal (one cache entry) when everything that shapes the
    result is: the files' paths, modification times and sizes, the classes, the label rate and frame rule, and
    the minimum length."""

    pair: tuple[Path, Path | None]
    stamps: tuple[tuple[int, int], ...]
    num_classes: int
    rate_hz: int
    conv_layers: str
    min_seconds: float
    rate: LabelRate = dataclasses.field(compare=False)
    data: Any = dataclasses.field(compare=False)


# Parsed manifests and labels kept per client process: enough for every client of a LibriSpeech-scale study (a
# 25-minute speaker's labels are ~300 KB as int16, so 2,048 of them ~600 MB at most; the synthetic ones far less).
@functools.lru_cache(maxsize=2048)
def _parsed(parse: _Parse) -> list:
    return load_utterances([parse.pair], parse.num_classes, parse.data, parse.rate)


def utterances(pair: tuple[Path, Path | None], num_classes: int, rate: LabelRate, data) -> list:
    """Parsed and checked manifest + labels, kept in the client process across rounds while the files are
    unchanged."""
    stamps = tuple((s.st_mtime_ns, s.st_size) for p in pair if p is not None for s in [p.stat()])
    return _parsed(
        _Parse(pair, stamps, num_classes, rate.rate, repr(rate.model.conv_layers), data.min_seconds, rate, data)
    )


def head_file(work: Path, round_: int) -> Path:
    return work / f"head_round_{round_:05d}.pt"


def latest_head(work: Path, up_to_round: int) -> Path | None:
    """The client's head after the last round it trained in, up to `up_to_round` (exact resume)."""
    rounds = sorted(int(m[1]) for p in work.glob("head_round_*.pt") if (m := _HEAD.fullmatch(p.name)))
    rounds = [r for r in rounds if r <= up_to_round]
    return head_file(work, rounds[-1]) if rounds else None


def client_heads(out: Path, num_clients: int, up_to_round: int) -> dict[str, str]:
    """Each client's newest local head up to `up_to_round`, as a path relative to `out` (for a checkpoint)."""
    return {
        str(c): str(h.relative_to(out))
        for c in range(num_clients)
        if (h := latest_head(out / "clients" / f"client_{c}", up_to_round)) is not None
    }


def heads_to_keep(rounds: list[int], checkpoint_rounds: list[int]) -> set[int]:
    """Of a client's head rounds (sorted; the last is this round's), those some checkpoint may resume from: the
    newest, and for each round checkpoint on the server's disk the newest head up to its round."""
    keep = {rounds[-1]}
    for checkpoint in checkpoint_rounds:
        below = [r for r in rounds if r <= checkpoint]
        if below:
            keep.add(below[-1])
    return keep


def save_head(
    work: Path,
    round_: int,
    state: dict[str, torch.Tensor],
    keys: Iterable[str],
    keep_every: int,
    checkpoint_rounds: list[int] | None = None,
) -> None:
    """This round's head, then the client's older heads that no checkpoint can resume from go: with
    `checkpoint_rounds` (the server's round checkpoints, under checkpoint_keep) all but those `heads_to_keep`
    names; without, all but the last two and those at multiples of `keep_every` (every checkpoint is kept)."""
    buffer = io.BytesIO()
    torch.save({k: state[k].detach().cpu() for k in keys}, buffer)
    atomic_write_bytes(head_file(work, round_), buffer.getvalue())
    rounds = sorted(int(m[1]) for p in work.glob("head_round_*.pt") if (m := _HEAD.fullmatch(p.name)))
    if checkpoint_rounds is not None:
        keep = heads_to_keep(rounds, checkpoint_rounds)
        old = [r for r in rounds if r not in keep]
    else:
        old = [r for r in rounds[:-2] if r % keep_every]
    for r in old:
        head_file(work, r).unlink(missing_ok=True)


def client_seed(seed: int, round_: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, round_, index]).generate_state(1)[0])


def identify(message: Message, context: Context) -> Message:
    """Which client this node is (its partition id), and of how many (its `num-partitions`, where the node config
    has it: Flower's simulation and `fedhubert supernode` set it)."""
    node = context.node_config
    said = {"client": int(node["partition-id"])}
    if "num-partitions" in node:
        said["num_partitions"] = int(node["num-partitions"])
    return Message(RecordDict({"metrics": MetricRecord(said)}), reply_to=message)


@dataclass
class LocalTask:
    """What a training task's client builds each round (the rest of a round is the same for every task)."""

    model: torch.nn.Module  # freshly built with the run's seed (the server's initial model)
    objective: Any  # fedhubert.train.loop.Objective
    head_keys: tuple[str, ...]  # parameters that stay on this client (empty: everything is shared)
    num_classes: int
    rate: LabelRate
    with_labels: bool


@dataclass(frozen=True)
class LocalTraining:
    """What `train_locally` did: the mean training metrics (keys `train_*`), the utterances it trained on, the batch
    cap it used (for a validation pass alike) and its wall time."""

    metrics: dict[str, float]
    utterances: list
    batch_cap: int
    seconds: float


def train_locally(
    model: torch.nn.Module,
    task: LocalTask,
    cfg: RoundsConfig,
    place: ClientPlace,
    round_: int,
    global_step: int,
    device: torch.device,
    on_step: Callable[[int, dict], None] | None = None,
) -> LocalTraining:
    """`cfg.local_steps` updates of `model` (already on `device`) on this client's training split: crops, masks and
    dropout seeded by (seed, round, client), a fresh optimizer, masked prediction scored against this client's
    label-frequency baseline, the learning rate of global step `global_step` on. Every client round of every app
    trains through here (fedhubert's round loop and the SecAgg+ app)."""
    from fedhubert.train.data import batch_loader, label_counts
    from fedhubert.train.loop import MaskedPrediction, cycle_batches, label_log_prior, make_optimizer, train
    from fedhubert.train.memory import batch_cap

    seed = client_seed(cfg.seed, round_, place.index)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    cap = batch_cap(cfg.train, task.rate.model, task.num_classes)
    train_utts = utterances(place.pair("train"), task.num_classes, task.rate, cfg.train.data)
    if isinstance(task.objective, MaskedPrediction):  # this client's label-frequency baseline
        task.objective.log_prior = label_log_prior(label_counts(train_utts, task.num_classes))
    started = time.perf_counter()
    result = train(
        model,
        cycle_batches(batch_loader(train_utts, task.rate, cfg.train.data, seed, cap)),
        cfg.train,
        objective=task.objective,
        steps=cfg.local_steps,
        global_step=global_step,
        optimizer=make_optimizer(model, cfg.train.optim),
        device=device,
        on_step=on_step,
    )
    metrics = {f"train_{k}": float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    return LocalTraining(metrics, train_utts, cap, time.perf_counter() - started)


# The round's values that change from round to round or client to client: not part of what a LocalTask is built for.
_PER_ROUND = (
    "round",
    "global_step",
    "client",
    "clip_norm",
    "noise_multiplier",
    "sampled",
    "threads",
    "checkpoint_rounds",
)
_NODE_IDENTITY = ("partition-id", "num-partitions")


@dataclass
class _Built:
    task: LocalTask
    initial: dict[str, torch.Tensor]  # the built model's values of what the server does not send (a new head)


_BUILT: dict[str, _Built] = {}
_BUILT_MAX = 2  # models kept per client process (client overrides of the trainer make more than one)


def reused_task(cfg: RoundsConfig, info, context: Context, build, received: set[str]) -> tuple[LocalTask, dict]:
    """The LocalTask `build(cfg, info, context)` gives, built once per client process and reused by every client
    and round it serves (a HuBERT Base takes seconds to build), with the built model's values of the keys not in
    `received` (so that a client without a head of its own starts from the initial one, as a fresh build would).
    Kept by everything the build depends on: the config, the round's task scalars and the node config (less the
    node's partition-id, which no build reads: a process serving a pool of virtual clients' nodes keeps one model)."""
    from fedhubert.config import config_to_dict

    key = repr(
        (
            getattr(build, "__qualname__", repr(build)),
            config_to_dict(cfg),
            sorted((k, info[k]) for k in info if k not in _PER_ROUND),
            sorted((k, v) for k, v in context.node_config.items() if k not in _NODE_IDENTITY),
            sorted(received),
        )
    )
    built = _BUILT.pop(key, None)
    if built is None:
        task = build(cfg, info, context)
        initial = {k: v.detach().clone() for k, v in task.model.state_dict().items() if k not in received}
        built = _Built(task, initial)
        while len(_BUILT) >= _BUILT_MAX:
            _BUILT.pop(next(iter(_BUILT)))
    else:
        for parameter in built.task.model.parameters():
            parameter.grad = None
    _BUILT[key] = built
    return built.task, built.initial


_RECEIVED: dict[str, Any] = {}


def received_config(config_cls: type[T], record) -> T:
    """The stage config a message carries, parsed once per process for each distinct record (every client of a
    round gets the same one). The config is never modified after it is built, so the parsed object is shared."""
    from fedhubert.fl.records import config_from_record

    key = repr((config_cls.__qualname__, sorted(record.items())))
    cfg = _RECEIVED.pop(key, None)
    if cfg is None:
        cfg = config_from_record(config_cls, record)
        while len(_RECEIVED) >= 4:
            _RECEIVED.pop(next(iter(_RECEIVED)))
    _RECEIVED[key] = cfg
    return cfg


def validation_subset(utts: list, seconds: float) -> list:
    """The first utterances of a client's validation split, up to `seconds` of audio (at least one): the same ones
    every round, so the client's validation curve stays comparable and its cost bounded."""
    kept, total = [], 0.0
    for utt in utts:
        if kept and total + utt.num_samples / 16000 > seconds:
            break
        kept.append(utt)
        total += utt.num_samples / 16000
    return kept


def local_round(message: Message, context: Context, config_cls: type, build) -> Message:
    """One round of local training: from the received weights (and this client's own head), `local_steps`
    updates on this client's data, a validation pass on at most `valid_seconds` of its validation split, and the
    reply with the shared weights and the metrics. `build(cfg, info, context)` gives the task's LocalTask, built
    once per client process (`reused_task`)."""
    import logging

    from fedhubert.fl.privacy import privatise_change
    from fedhubert.fl.weights import decode, encode
    from fedhubert.train.data import batch_loader
    from fedhubert.train.loop import evaluate, resolve_device

    log = logging.getLogger(__name__)
    info = message.content["round"]
    out, round_ = Path(str(info["out"])), int(info["round"])
    cfg = received_config(config_cls, message.content["config"])
    if int(info["threads"]) > 0:
        torch.set_num_threads(int(info["threads"]))
    index, virtual = served_client(message, context, "round")
    place = client_place(cfg, out, context, index, virtual, with_labels=cfg.kmeans is not None)
    cfg = with_client_overrides(cfg, place)
    received = decode(message.content["arrays"], cfg.transfer)
    task, initial = reused_task(cfg, info, context, build, set(received))
    if not task.with_labels:
        place = dataclasses.replace(place, kmeans=None)
    model = task.model
    state = {**initial, **received}
    if task.head_keys:
        head = latest_head(place.work, round_ - 1)
        if head is not None:
            state.update(torch.load(head, map_location="cpu", weights_only=True))
    model.load_state_dict(state)
    device = resolve_device(cfg.train.device)
    model.to(device)

    def progress(step: int, metrics: dict) -> None:
        log.info("client %d, round %d, update %d: loss %.3f", place.index, round_, step, metrics["loss"])

    trained = train_locally(model, task, cfg, place, round_, int(info["global_step"]), device, progress)
    train_utts, cap, seconds = trained.utterances, trained.batch_cap, trained.seconds
    metrics = dict(trained.metrics)
    if cfg.valid_seconds > 0 and place.has("valid"):
        try:
            valid_utts = utterances(place.pair("valid"), task.num_classes, task.rate, cfg.train.data)
        except DataError as error:  # e.g. a one-speaker client whose validation utterances are all short
            log.warning("client %d, round %d: validation skipped (%s); the update is sent", place.index, round_, error)
            metrics["valid_skipped"] = 1
        else:
            valid = evaluate(
                model,
                batch_loader(
                    validation_subset(valid_utts, cfg.valid_seconds), task.rate, cfg.train.data, cfg.seed + 1, cap
                ),
                cfg.train,
                objective=task.objective,
                device=device,
                seed=cfg.seed,
            )
            metrics.update({f"valid_{k}": float(v) for k, v in valid.items() if isinstance(v, (int, float))})
    new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if task.head_keys:
        kept = list(info["checkpoint_rounds"]) if "checkpoint_rounds" in info else None
        save_head(place.work, round_, new_state, task.head_keys, cfg.checkpoint_every, kept)
    if cfg.privacy.mode == "client":  # clipped and noised here, before anything leaves the client
        clip = float(info["clip_norm"])  # this round's bound (adaptive clipping moves it)
        change, norm, was_clipped = privatise_change(
            {k: new_state[k].float() - received[k] for k in received},
            clip,
            float(info["noise_multiplier"]),
            int(info["sampled"]),
            cfg.seed,
            round_,
            place.index,
            cfg.privacy.per_layer_clipping,
        )
        metrics.update(update_norm=norm, clipped=int(was_clipped))
        new_state = {**new_state, **{k: received[k] + change[k] for k in change}}
    if cfg.transfer == "bfloat16":  # the change, not the weights: rounding weights would drown small changes
        shared = {k: new_state[k].float() - received[k] for k in received}
    else:
        shared = {k: v for k, v in new_state.items() if k in received}
    metrics.update(
        {"client": place.index, "num-examples": sum(u.num_samples for u in train_utts) / 16000, "train_time_s": seconds}
    )
    return Message(
        RecordDict({"arrays": encode(shared, cfg.transfer), "metrics": MetricRecord(metrics)}), reply_to=message
    )
