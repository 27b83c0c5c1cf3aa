"""The server's round loop for federated training tasks (pretraining, distillation).

Each round: sample clients by partition id (seeded by the round, so a resumed run samples the same clients),
send the shared weights and the config to the nodes that serve them (`fedhubert.fl.nodes`: with virtual clients
each message names its client), take each reply as it arrives (`fedhubert.fl.exchange`), and fold the ones that
pass the checks (no error, the expected parameters and shapes, finite values) into a running weighted mean
(`fedhubert.fl.aggregation`: the server holds a few model copies whatever the number of replies), to which the
Flower strategy's server update is applied; log per-client and aggregated metrics, evaluate on the server every
`evaluate_every` rounds, and checkpoint every `checkpoint_every` rounds and after the last. A failed client is
logged and left out; a round with fewer replies than `strategy.min_clients` stops the run with an error, after
making sure the last completed round is checkpointed. A `STOP` file in the run folder (written by the stage's
command on SIGTERM) ends the run after the current round, checkpointed. `resume` continues from the newest
readable checkpoint (a corrupt one is skipped with a warning; none at all is an error).

The clients get the config with the learning-rate schedule fitted to the run (`fedhubert.train.schedule`). With
`transfer=bfloat16` the server sends its weights rounded to bfloat16 and the clients reply with their change
(trained - received) in bfloat16, which the server adds to its float32 weights: rounding the weights instead
would drown small updates in rounding noise. Every round records the server's step against the clients' mean
change (norms, their ratio and cosine), so that a server optimizer that does not follow its clients shows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedhubert.atomic import atomic_write_text
from fedhubert.config import config_to_dict
from fedhubert.errors import FedhubertError
from fedhubert.fl.aggregation import WEIGHT_KEY, StreamingMean
from fedhubert.fl.config import RoundsConfig
from fedhubert.fl.exchange import (
    FittedTimeout,
    Stragglers,
    client_error,
    exchange,
    message_ttl,
    send_window,
    stored_messages,
)
from fedhubert.fl.nodes import ClientNodes, connect_clients, in_simulation
from fedhubert.fl.privacy import (
    Accountant,
    ClipBound,
    UpdateAudit,
    check_settings,
    noise_for_target,
    update_noise_multiplier,
    update_norm,
)
from fedhubert.fl.records import MessageLog, config_to_record
from fedhubert.fl.round_log import RoundLog, read_rows
from fedhubert.fl.server_step import StepWatch, server_step
from fedhubert.fl.strategy import make_strategy
from fedhubert.fl.weights import WeightsError, check_update, decode, encode
from fedhubert.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sidecar
from fedhubert.runlog import RoundClock
from fedhubert.train.learning import learning_check, log_verdict
from fedhubert.train.schedule import describe, fit_schedule, schedule_record, schedule_warnings

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STOP_FILE = "STOP"
_ROUND_FILE = re.compile(r"round_(\d+)\.pt")
# The kind of checkpoint each training task writes (fedhubert.model.checkpoint).


class RoundError(FedhubertError):
    """A round could not be completed."""


@dataclass
class RoundTask:
    """What a federated training task gives the loop."""

    name: str  # pretrain, distill
    message_type: str  # the ClientApp handler
    checkpoint_kind: str
    model_config: Any
    num_classes: int
    state: dict[str, torch.Tensor]  # the full initial state dict; once the rounds start, only its unshared keys
    shared_keys: list[str]  # what is aggregated
    round_info: dict[str, Any]  # extra scalars every client gets
    # (state, label for its progress lines) -> metrics; its `sample` (if any) describes the held-out audio.
    evaluate: Callable[[dict[str, torch.Tensor], str], dict] | None = None
    best_key: str | None = None
    higher_is_better: bool = True
    local_steps: int | None = None  # the most updates any client runs a round (client overrides); None: the config's
    default_lr: float = 5e-4  # the client learning rate where train.optim.lr is null (the model preset's)
    checkpoint_extra: Callable[[int], dict] = field(default=lambda round_: {})
    # Each client's audio in seconds, by partition id: a round's clients go to the nodes longest first.
    client_seconds: Sequence[float] = ()
    # Clients that can never take part (e.g. k-means left them without labels), with the reason: never sampled.
    unavailable: Mapping[int, str] = field(default_factory=dict)


def stop_requested(out: Path) -> str | None:
    """Why the run should stop after the current round (the text of `STOP` in the run folder), or None. The
    stage's command writes it when it gets SIGTERM; the server, which may run in another process, reads it."""
    try:
        return (Path(out) / STOP_FILE).read_text().strip() or "stop requested"
    except FileNotFoundError:
        return None


def summary_path(out: Path, task: str) -> Path:
    """Where the ServerApp of a training task writes its summary, which the stage's command reads back."""
    return Path(out) / f"{task}.json"


def round_checkpoint(out: Path, round_: int) -> Path:
    return Path(out) / CHECKPOINTS / f"round_{round_:05d}.pt"


def _round_files(out: Path) -> list[tuple[int, Path]]:
    """The run's round checkpoints, oldest first."""
    found = (Path(out) / CHECKPOINTS).glob("round_*.pt")
    return sorted((int(m[1]), p) for p in found if (m := _ROUND_FILE.fullmatch(p.name)))


def prune_round_checkpoints(out: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` round checkpoints, with their .sha256 sidecars (best.pt and final.pt are
    not round checkpoints); None keeps all. What was deleted, oldest first."""
    if keep is None:
        return []
    old = [path for _, path in _round_files(out)[:-keep]]
    for path in old:
        path.unlink(missing_ok=True)
        sidecar(path).unlink(missing_ok=True)
    return old


def newest_checkpoint(out: Path, kind: str) -> tuple[Path, dict] | None:
    """The newest round checkpoint that loads and matches its checksum; corrupt ones are skipped with a warning."""
    for _, path in reversed(_round_files(out)):
        try:
            return path, load_checkpoint(path, kind=kind)
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s", path.name, err)
    return None


def changed_keys(a: dict, b: dict, allowed: tuple[str, ...]) -> list[str]:
    """Top-level config keys that differ between `a` and `b`, other than `allowed`."""
    return sorted(k for k in set(a) | set(b) if k not in allowed and a.get(k) != b.get(k))


class FederatedRun:
    def __init__(
        self, grid: Grid, cfg: RoundsConfig, out: Path, task: RoundTask, num_clients: int, *, resume: bool, threads: int
    ):
        self.grid, self.cfg, self.out, self.task = grid, cfg, Path(out), task
        self.num_clients, self.resume, self.threads = num_clients, resume, threads
        self.strategy = make_strategy(cfg.strategy)
        self.messages = MessageLog(self.out / "messages.jsonl")
        self.records = RoundLog(self.out, num_clients)
        self.timeout = FittedTimeout(cfg.round_timeout_s, slack_s=cfg.round_timeout_slack_s)
        self.stragglers = Stragglers()  # instructions a round gave up on, until the SuperLink has let them go
        self.best: dict | None = None
        self.saved_round = -1
        self.planned = cfg.num_rounds * (task.local_steps or cfg.local_steps)
        self.schedule = schedule_record(cfg.train.optim, self.planned, task.default_lr)
        self.sent_cfg = dataclasses.replace(
            cfg,
            train=dataclasses.replace(cfg.train, optim=fit_schedule(cfg.train.optim, self.planned, task.default_lr)),
        )
        self.audit: UpdateAudit | None = None
        self.clients: ClientNodes | None = None
        self._population(dict(task.unavailable))

    def _population(self, unavailable: dict[int, str]) -> None:
        """Who can be sampled, and what follows from their number: how many a round samples and needs, the clipping
        bound, the noise and the accountant (sampling rate: sampled / available)."""
        self.unavailable = unavailable
        self.available = [client for client in range(self.num_clients) if client not in unavailable]
        if unavailable:
            log.warning(
                "%d of %d clients are never sampled: %s",
                len(unavailable),
                self.num_clients,
                "; ".join(f"client {c}: {why}" for c, why in sorted(unavailable.items())[:10])
                + (f"; and {len(unavailable) - 10} more" if len(unavailable) > 10 else ""),
            )
        if not self.available:
            raise RoundError(f"none of the {self.num_clients} clients can take part: {unavailable}")
        self.min_required = min(self.cfg.strategy.min_clients, len(self.available))
        self.sampled = self.cfg.strategy.sample_size(len(self.available))
        check_settings(self.cfg.privacy, len(self.available), self.sampled)
        noise = self.cfg.privacy.noise_multiplier
        if noise is None and self.cfg.privacy.mode != "none":
            noise = noise_for_target(self.cfg.privacy, len(self.available), self.sampled, self.cfg.num_rounds)
            log.info(
                "privacy.noise_multiplier=%.4g: the smallest that keeps epsilon within privacy.target_epsilon=%g "
                "after %d rounds of %d of %d clients (delta %g)",
                noise,
                self.cfg.privacy.target_epsilon,
                self.cfg.num_rounds,
                self.sampled,
                len(self.available),
                self.cfg.privacy.delta,
            )
        self._set_noise(noise or 0.0)
        self.clip = ClipBound(self.privacy, self.sampled) if self.privacy.mode != "none" else None

    def _set_noise(self, noise: float) -> None:
        """The noise multiplier the run adds and accounts, and what follows from it."""
        self.privacy = dataclasses.replace(self.cfg.privacy, noise_multiplier=noise)
        check_settings(self.privacy, len(self.available), self.sampled)
        self.update_noise = update_noise_multiplier(self.privacy, self.sampled)
        self.accountant = (
            Accountant(self.privacy, len(self.available), self.sampled)
            if self.privacy.mode != "none" and self.privacy.noise_multiplier > 0
            else None
        )

    # ------------------------------------------------------------------------------------------- setup
    def _restore(self) -> tuple[int, int, dict[str, torch.Tensor]]:
        found = newest_checkpoint(self.out, self.task.checkpoint_kind) if self.resume else None
        state = dict(self.task.state)
        if found is None:
            if self.resume:
                raise RoundError(f"no readable checkpoint to resume from in {self.out / CHECKPOINTS}")
            for problem in schedule_warnings(self.cfg.train.optim, self.planned):
                log.warning("%s", problem)
            log.info("%s", describe(self.schedule))
            return 0, 0, state
        path, payload = found
        saved = payload["state"]
        changed = changed_keys(saved["config"], config_to_dict(self.cfg), self.cfg.RESUMABLE)
        if changed:
            raise RoundError(
                f"cannot resume from {path}: the config differs in {changed}; only "
                f"{', '.join(self.cfg.RESUMABLE)} may change when resuming"
            )
        state.update(payload["state_dict"])
        self.strategy.load_state(saved["strategy"])
        if self.clip is not None:
            self.clip.value = float(saved["privacy"]["clip_norm"])
            chosen = saved["privacy"].get("noise_multiplier", self.privacy.noise_multiplier)
            if chosen != self.privacy.noise_multiplier:
                # Chosen for the target over the planned rounds; a resumed run with other rounds keeps it (the
                # accountant's ledger is in its units), and the target stops the run if more rounds would exceed it.
                log.info("keeping the noise multiplier the run chose, %.4g (privacy.noise_multiplier=null)", chosen)
                self._set_noise(float(chosen))
        if self.accountant is not None:
            self.accountant.load_state(saved["privacy"]["accountant"])
            if self.accountant.next_round_exceeds() and int(saved["round"]) < self.cfg.num_rounds:
                raise RoundError(
                    f"cannot resume from {path}: the privacy budget is spent (epsilon "
                    f"{self.accountant.epsilon():.3f} after {self.accountant.rounds} rounds; one more round would "
                    f"exceed privacy.target_epsilon={self.privacy.target_epsilon:g})"
                )
        before = saved.get("schedule")
        if before and (before["warmup_steps"], before["total_steps"]) != (
            self.schedule["warmup_steps"],
            self.schedule["total_steps"],
        ):
            log.warning(
                "resuming with num_rounds=%d changes the learning-rate schedule: warm-up %d -> %d updates, "
                "decay to 0 at update %d -> %d (the rate of the rounds still to run follows the new one)",
                self.cfg.num_rounds,
                before["warmup_steps"],
                self.schedule["warmup_steps"],
                before["total_steps"],
                self.schedule["total_steps"],
            )
        log.info("%s", describe(self.schedule))
        self.best = saved.get("best")
        round_, global_step = int(saved["round"]), int(saved["global_step"])
        rows = [r for r in read_rows(self.records.path) if r["round"] <= round_]
        atomic_write_text(self.records.path, "".join(json.dumps(r) + "\n" for r in rows))
        self.saved_round = round_
        log.info("resuming from %s: round %d done, global step %d", path.name, round_, global_step)
        return round_, global_step, state

    def _sample(self, round_: int) -> list[int]:
        rng = np.random.default_rng([self.cfg.seed, round_])
        return sorted(int(c) for c in rng.choice(self.available, size=self.sampled, replace=False))

    def _round(
        self, round_: int, arrays: dict[str, torch.Tensor], global_step: int
    ) -> tuple[StreamingMean, dict[int, dict], dict[int, str], int, int]:
        """Send the round's clients the weights and fold each reply into a StreamingMean as it arrives. Returns it,
        the accepted clients' metrics, the failed clients with the reason, how many were sampled and how many nodes
        served them."""
        chosen = self._sample(round_)
        plan = self.clients.assign(chosen, self.task.client_seconds)
        payload = encode(arrays, self.cfg.transfer)
        config = config_to_record(self.sent_cfg)
        kept = [r for r, _ in _round_files(self.out)] if self.cfg.checkpoint_keep is not None else None
        wait_s = self.timeout.seconds()
        outgoing = []
        for client, node in plan:
            info = self._round_info(round_, global_step, client, kept)
            message = Message(
                RecordDict({"arrays": payload, "config": config, "round": info}),
                dst_node_id=node,
                message_type=self.task.message_type,
                group_id=str(round_),
                ttl=message_ttl(wait_s),
            )
            self.messages.record("to_client", message, round_, client)
            outgoing.append((client, message))
        stream = StreamingMean(
            arrays,
            self.privacy,
            clip=self.clip.value if self.clip is not None else None,
            noise_multiplier=self.update_noise,
            seed=self.cfg.seed,
            round_=round_,
            audit=self.audit,
        )
        accepted: dict[int, dict] = {}
        failed: dict[int, str] = {}

        def take(client: int, reply: Message) -> None:
            self.messages.record("from_client", reply, round_, client)
            if reply.has_error():
                failed[client] = f"client error: {client_error(reply)}"
                return
            try:
                if "arrays" not in reply.content or "metrics" not in reply.content:
                    raise WeightsError("reply lacks 'arrays' or 'metrics'")
                if self.privacy.mode == "client" and "update_norm" not in reply.content["metrics"]:
                    raise WeightsError("no update_norm: the client did not clip its update (privacy.mode=client)")
                tensors = decode(reply.content["arrays"], self.cfg.transfer)
                check_update(tensors, arrays, self.task.shared_keys)
            except WeightsError as err:
                failed[client] = f"rejected update: {err}"
                return
            if self.cfg.transfer == "float32":  # weights: the change against what was sent (in place: one copy)
                for key in arrays:
                    tensors[key].sub_(arrays[key])
            # What the server can see of each client: the length of its change (what clip_norm is chosen from).
            received = update_norm(tensors)
            metrics = {**dict(reply.content["metrics"]), "received_norm": received}
            metrics.update(stream.add(client, tensors, metrics, received))
            accepted[client] = metrics

        window = send_window(len({node for _, node in plan}))
        done = exchange(
            self.grid,
            outgoing,
            take,
            timeout_s=wait_s,
            label=f"round {round_}",
            window=window,
            stragglers=self.stragglers,
        )
        self.timeout.observe(done)
        for client in done.missing:
            failed[client] = f"no reply within {wait_s:.0f} s"
        for client, reason in sorted(failed.items()):
            log.warning("round %d: client %d left out: %s", round_, client, reason)
            self.records.write({"kind": "failure", "round": round_, "client": client, "reason": reason})
        return stream, accepted, failed, len(chosen), len({node for _, node in plan})

    def _privacy_row(self, stream: StreamingMean, round_: int, sampled: int) -> dict[str, float]:
        """The round's privacy record (fedhubert.fl.privacy); adaptive clipping moves the bound here."""
        if self.privacy.mode == "none":
            return {}
        clip = self.clip.value
        record = stream.privacy_report(sampled).record()
        if self.privacy.adaptive_clipping:
            record["privacy_unclipped_share_noised"] = self.clip.update(
                [n > clip for n in stream.norms], self.cfg.seed, round_
            )
            record["privacy_next_clip_norm"] = self.clip.value
        return record

    def _round_info(self, round_: int, global_step: int, client: int, kept: list[int] | None) -> ConfigRecord:
        """What a client needs of this round besides the config; `kept`: the rounds of the checkpoints on disk
        (with checkpoint_keep), so that a client with a local head keeps only the heads they can resume from."""
        return ConfigRecord(
            {
                "round": round_,
                **({"checkpoint_rounds": kept} if kept is not None else {}),
                "global_step": global_step,
                "sampled": self.sampled,
                **({"client": client} if self.clients.virtual else {}),
                **(
                    {"clip_norm": self.clip.value, "noise_multiplier": self.update_noise}
                    if self.privacy.mode == "client"
                    else {}
                ),
                "out": str(self.out),
                "threads": self.threads,
                **self.task.round_info,
            }
        )

    def _round_checkpoint(self, round_: int, global_step: int, arrays: dict[str, torch.Tensor]) -> None:
        """round_<r>.pt, then the round checkpoints beyond `checkpoint_keep` go (only once the new one is whole)."""
        self._checkpoint(round_checkpoint(self.out, round_), round_, global_step, arrays)
        self.saved_round = round_
        for path in prune_round_checkpoints(self.out, self.cfg.checkpoint_keep):
            log.debug("deleted %s (checkpoint_keep=%s)", path.name, self.cfg.checkpoint_keep)

    def _checkpoint(self, name: Path, round_: int, global_step: int, arrays: dict[str, torch.Tensor]) -> None:
        state = {**self.task.state, **arrays}
        save_checkpoint(
            name,
            kind=self.task.checkpoint_kind,
            model=self.task.model_config,
            num_classes=self.task.num_classes,
            state_dict=state,
            label_rate=self.task.round_info["label_rate"],
            state={
                "stage": self.task.name,
                "round": round_,
                "global_step": global_step,
                "strategy": {"name": self.cfg.strategy.name, **self.strategy.state()},
                "rng": {
                    "python": random.getstate(),
                    "numpy": np.random.get_state()[1].tolist(),
                    "torch": torch.get_rng_state(),
                },
                "config": config_to_dict(self.cfg),
                "best": self.best,
                "schedule": self.schedule,
                "privacy": None
                if self.clip is None
                else {
                    "clip_norm": self.clip.value,
                    "noise_multiplier": self.privacy.noise_multiplier,
                    "accountant": self.accountant.state() if self.accountant is not None else None,
                },
                **self.task.checkpoint_extra(round_),
            },
        )

    def _improves(self, result: dict) -> bool:
        key = self.task.best_key
        if key is None:
            return False
        if self.best is None:
            return True
        return result[key] > self.best[key] if self.task.higher_is_better else result[key] < self.best[key]

    def _privacy_summary(self) -> dict | None:
        if self.privacy.mode == "none":
            return None
        return {
            "mode": self.privacy.mode,
            "clip_norm": self.privacy.clip_norm,
            "adaptive_clipping": self.privacy.adaptive_clipping,
            "final_clip_norm": self.clip.value,
            "noise_multiplier": self.privacy.noise_multiplier,
            "noise_chosen_for_target": self.cfg.privacy.noise_multiplier is None,
            "update_noise_multiplier": self.update_noise,
            "delta": self.privacy.delta if self.accountant is not None else None,
            "epsilon": self.accountant.epsilon() if self.accountant is not None else math.inf,
            "accounted_rounds": self.accountant.rounds if self.accountant is not None else 0,
            "target_epsilon": self.privacy.target_epsilon,
        }

    def run(self) -> dict:
        self.clients = connect_clients(
            self.grid,
            self.num_clients,
            self.cfg.federation.virtual(in_simulation(self.grid)),
            self.cfg.federation.connect_timeout_s,
            self.cfg.round_timeout_s,
            pool=self.cfg.federation.supernodes,
            least=self.min_required,
        )
        missing = [c for c in self.clients.missing() if c not in self.unavailable]
        if missing:
            reason = f"its SuperNode did not connect within {self.cfg.federation.connect_timeout_s:.0f} s"
            self._population({**self.unavailable, **{client: reason for client in missing}})
        start, global_step, state = self._restore()
        arrays = {k: state[k].to(torch.float32) for k in self.task.shared_keys}
        self.task.state.update(state)
        for key in arrays:  # in place: the rounds' arrays hold these, so the initial weights would be one model more
            del self.task.state[key]
        del state
        if self.privacy.audit_coordinates:
            self.audit = UpdateAudit(self.out / "audit", arrays, self.privacy.audit_coordinates, self.cfg.seed)
        started = time.monotonic()
        clock = RoundClock(start + 1, self.cfg.num_rounds)
        strategy = self.cfg.strategy
        watch = StepWatch(
            strategy.name,
            *strategy.server_rates(),
            beta_1=strategy.first_moment() if strategy.name in ("fedadam", "fedyogi") else None,
        )
        stopped, stop_reason = None, None
        if start == 0 and self.task.evaluate is not None:
            first = self.task.evaluate({**self.task.state, **arrays}, "round 0 server evaluation")
            self.records.write({"kind": "eval", "round": 0, **first})
            log.info("round 0 (initial model) server evaluation%s: %s", _took(first), _brief(first))
        for round_ in range(start + 1, self.cfg.num_rounds + 1):
            if self.accountant is not None and self.accountant.next_round_exceeds():
                if self.saved_round < round_ - 1:
                    self._round_checkpoint(round_ - 1, global_step, arrays)
                log.warning(
                    "stopping after round %d of %d: round %d would take epsilon above privacy.target_epsilon=%g "
                    "(spent: %.3f at delta %g); the state is checkpointed",
                    round_ - 1,
                    self.cfg.num_rounds,
                    round_,
                    self.privacy.target_epsilon,
                    self.accountant.epsilon(),
                    self.privacy.delta,
                )
                stopped, stop_reason = round_ - 1, "privacy budget"
                break
            round_started = time.monotonic()
            stream, accepted, failed, sampled, served_by = self._round(round_, arrays, global_step)
            if len(accepted) < self.min_required:
                if self.saved_round < round_ - 1:
                    self._round_checkpoint(round_ - 1, global_step, arrays)
                raise RoundError(
                    f"round {round_}: {len(accepted)} of {sampled} clients replied usable updates, fewer than "
                    f"strategy.min_clients={self.min_required} "
                    f"({'; '.join(f'client {c}: {r}' for c, r in sorted(failed.items()))}). "
                    f"The state after round {round_ - 1} is checkpointed; fix the clients and continue with --resume"
                )
            if self.audit is not None:
                self.audit.write(round_, stream.audited)
            privacy_row = self._privacy_row(stream, round_, sampled)
            aggregate = stream.result()
            del stream
            mean = encode({k: arrays[k] + aggregate.change[k] for k in arrays}, "float32")
            self.strategy.begin_round(arrays)
            new, _ = self.strategy.aggregate(
                round_,
                [
                    Message(
                        RecordDict({"arrays": mean, "metrics": MetricRecord({WEIGHT_KEY: 1.0})}),
                        dst_node_id=0,
                        message_type="train",
                    )
                ],
                {k: np.dtype(np.float32) for k in arrays},
            )
            del mean
            new_arrays = {k: torch.from_numpy(a.numpy().copy()) for k, a in new.items()}
            del new
            step_stats = server_step(arrays, new_arrays, aggregate.change)
            if (warning := watch.add(step_stats["step_ratio"], step_stats["step_cosine"])) is not None:
                log.warning("%s", warning)
            arrays = new_arrays
            round_metrics = aggregate.metrics
            del aggregate  # the mean change goes before the evaluation and the checkpoints
            if self.accountant is not None:
                # Mode client: only the clients that replied added their noise shares.
                shares = len(accepted) if self.privacy.mode == "client" else None
                epsilon = self.accountant.spend_round(shares)
                privacy_row.update(privacy_epsilon=epsilon, privacy_delta=self.privacy.delta)
            global_step += max(int(m.get("train_steps", self.cfg.local_steps)) for m in accepted.values())
            for _client, metrics in sorted(accepted.items()):  # metrics carry the client's index
                self.records.write({"kind": "client", "round": round_, **metrics})
            row = {
                "kind": "train",
                "round": round_,
                "clients": len(accepted),
                "failed": len(failed),
                "global_step": global_step,
                "seconds": round(time.monotonic() - round_started, 3),
                "valid_skipped": sum(int(m.get("valid_skipped", 0)) for m in accepted.values()),
                "late_replies_so_far": self.stragglers.late_replies,
                "stragglers_held": len(self.stragglers.ids),
                **stored_messages(self.grid),
                **step_stats,
                **privacy_row,
                **{
                    k: v
                    for k, v in round_metrics.items()
                    if k not in ("client", "update_norm", "clipped", "received_norm", "valid_skipped")
                },
            }
            self.records.write(row)
            log.info(
                "round %d/%d (%s): %d of %d clients on %d node(s), %s",
                round_,
                self.cfg.num_rounds,
                clock.status(round_),
                len(accepted),
                sampled,
                served_by,
                _brief({**round_metrics, **step_stats, **privacy_row}),
            )
            if self.task.evaluate is not None and (
                round_ % self.cfg.evaluate_every == 0 or round_ == self.cfg.num_rounds
            ):
                result = self.task.evaluate({**self.task.state, **arrays}, f"round {round_} server evaluation")
                self.records.write({"kind": "eval", "round": round_, **result})
                log.info("round %d server evaluation%s: %s", round_, _took(result), _brief(result))
                if self._improves(result):
                    self.best = {
                        "round": round_,
                        **{k: result[k] for k in (self.task.best_key, "loss", "gain_nats") if k in result},
                    }
                    self._checkpoint(self.out / CHECKPOINTS / "best.pt", round_, global_step, arrays)
            if round_ % self.cfg.checkpoint_every == 0 or round_ == self.cfg.num_rounds:
                self._round_checkpoint(round_, global_step, arrays)
            if round_ == self.cfg.num_rounds:
                self._checkpoint(self.out / CHECKPOINTS / "final.pt", round_, global_step, arrays)
            elif (reason := stop_requested(self.out)) is not None:
                if self.saved_round < round_:
                    self._round_checkpoint(round_, global_step, arrays)
                log.warning(
                    "stopping after round %d of %d at request (%s); the state is in %s",
                    round_,
                    self.cfg.num_rounds,
                    reason,
                    round_checkpoint(self.out, round_).name,
                )
                stopped, stop_reason = round_, reason
                break
        self.records.close()
        evals = [{"at": r["round"], **r} for r in read_rows(self.records.path) if r["kind"] == "eval"]
        verdict = learning_check(evals, f"the server's held-out set ({self.cfg.eval_subset})")
        log_verdict(verdict, self.task.name)
        return {
            "rounds": self.cfg.num_rounds,
            "schedule": self.schedule,
            "learning": verdict,
            "resumed_after_round": start,
            "global_step": global_step,
            "best": self.best,
            "seconds": round(time.monotonic() - started, 2),
            "stopped_after_round": stopped,
            "stopped_because": stop_reason,
            "privacy": self._privacy_summary(),
            "evaluation": getattr(self.task.evaluate, "sample", None),
            "final_checkpoint": None if stopped else str(self.out / CHECKPOINTS / "final.pt"),
        }


def _took(result: dict) -> str:
    """' (12 s, 600 s of audio)' for an evaluation's row."""
    if "eval_s" not in result:
        return ""
    return f" ({result['eval_s']:.0f} s, {result['eval_audio_s']:.0f} s of audio)"


def _brief(metrics: dict) -> str:
    keys = [
        k
        for k in (
            "train_loss",
            "valid_gain_nats",
            "loss",
            "ce_masked",
            "gain_nats",
            "predicted_clusters",
            "acc_masked",
            "step_ratio",
            "step_cosine",
            "privacy_clipped_fraction",
            "privacy_epsilon",
        )
        if k in metrics
    ]
    return ", ".join(f"{k} {metrics[k]:.3f}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}" for k in keys)
