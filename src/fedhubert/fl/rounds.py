"""The server's round loop for federated training tasks (pretraining, distillation).

Each round: sample clients by partition id (seeded by the round, so a resumed run samples the same clients),
send the shared weights and the config, take the replies that pass the checks (no error, the expected
parameters and shapes, finite values), aggregate them in client order with a Flower strategy, log per-client and
aggregated metrics, evaluate on the server every `evaluate_every` rounds, and checkpoint every
`checkpoint_every` rounds and after the last. A failed client is logged and left out; a round with fewer replies
than `strategy.min_clients` stops the run with an error, after making sure the last completed round is
checkpointed. A `STOP` file in the run folder (written by the stage's command on SIGTERM) ends the run after the
current round, checkpointed. `resume` continues from the newest readable checkpoint (a corrupt one is skipped with
a warning; none at all is an error).

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
from collections.abc import Callable
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
from fedhubert.fl.config import RoundsConfig
from fedhubert.fl.nodes import identify_clients
from fedhubert.fl.privacy import (
    Accountant,
    ClipBound,
    RoundPrivacy,
    UpdateAudit,
    check_settings,
    privatise_change,
    update_noise_multiplier,
    update_norm,
)
from fedhubert.fl.records import MessageLog, config_to_record
from fedhubert.fl.round_log import RoundLog, read_rows
from fedhubert.fl.strategy import make_strategy
from fedhubert.fl.weights import WeightsError, check_update, decode, encode
from fedhubert.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
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
    state: dict[str, torch.Tensor]  # the full initial state dict
    shared_keys: list[str]  # what is aggregated
    round_info: dict[str, Any]  # extra scalars every client gets
    evaluate: Callable[[dict[str, torch.Tensor]], dict] | None = None
    best_key: str | None = None
    higher_is_better: bool = True
    local_steps: int | None = None  # the most updates any client runs a round (client overrides); None: the config's
    default_lr: float = 5e-4  # the client learning rate where train.optim.lr is null (the model preset's)
    checkpoint_extra: Callable[[int], dict] = field(default=lambda round_: {})


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


def newest_checkpoint(out: Path, kind: str) -> tuple[Path, dict] | None:
    """The newest round checkpoint that loads and matches its checksum; corrupt ones are skipped with a warning."""
    files = sorted(
        ((int(m[1]), p) for p in (Path(out) / CHECKPOINTS).glob("round_*.pt") if (m := _ROUND_FILE.fullmatch(p.name))),
        reverse=True,
    )
    for _, path in files:
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
        self.records = RoundLog(self.out)
        self.min_required = min(cfg.strategy.min_clients, num_clients)
        self.best: dict | None = None
        self.saved_round = -1
        self.planned = cfg.num_rounds * (task.local_steps or cfg.local_steps)
        self.schedule = schedule_record(cfg.train.optim, self.planned, task.default_lr)
        self.sent_cfg = dataclasses.replace(
            cfg,
            train=dataclasses.replace(cfg.train, optim=fit_schedule(cfg.train.optim, self.planned, task.default_lr)),
        )
        self.privacy = cfg.privacy
        self.audit: UpdateAudit | None = None
        self.sampled = cfg.strategy.sample_size(num_clients)
        check_settings(self.privacy, num_clients, self.sampled)
        self.clip = ClipBound(self.privacy, self.sampled) if self.privacy.mode != "none" else None
        self.update_noise = update_noise_multiplier(self.privacy, self.sampled)
        self.accountant = (
            Accountant(self.privacy, num_clients, self.sampled)
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
        return sorted(int(c) for c in rng.choice(self.num_clients, size=self.sampled, replace=False))

    def _privatise(
        self,
        accepted: dict[int, tuple[dict, MetricRecord]],
        reference: dict[str, torch.Tensor],
        round_: int,
        sampled: int,
    ) -> tuple[dict[int, tuple[dict, MetricRecord]], dict[str, float]]:
        """The round's privacy step (fedhubert.fl.privacy). Mode server: each client's change clipped to clip_norm and
        its share of the noise added here; mode client: the clients did both. Returns the replies to aggregate and
        the round's record."""
        clip, replied = self.clip.value, len(accepted)
        private, norms, clipped = {}, [], []
        for client, (tensors, metrics) in sorted(accepted.items()):
            change = {k: tensors[k] - reference[k] for k in reference}
            if self.privacy.mode == "server":
                change, norm, was_clipped = privatise_change(
                    change,
                    clip,
                    self.update_noise,
                    replied,
                    self.cfg.seed,
                    round_,
                    client,
                    self.privacy.per_layer_clipping,
                    norm=float(metrics["received_norm"]),  # the norm of this change, from _check
                )
                extra = {"update_norm": norm, "clipped": int(was_clipped)}
            else:
                norm, was_clipped, extra = float(metrics["update_norm"]), bool(metrics["clipped"]), {}
            norms.append(norm)
            clipped.append(was_clipped)
            record = MetricRecord({**dict(metrics), **extra})
            private[client] = ({k: reference[k] + change[k] for k in change}, record)
        # The noise on the mean: m shares of std z C / sqrt(m) summed, over the k replies (k = m in mode server).
        shares = replied if self.privacy.mode == "server" else sampled
        report = RoundPrivacy(
            clip_norm=clip,
            clipped_fraction=sum(clipped) / replied,
            update_norm_median=float(np.median(norms)),
            update_norm_max=max(norms),
            noise_std=self.update_noise * clip * math.sqrt(replied / shares) / replied,
        )
        record = report.record()
        if self.privacy.adaptive_clipping:
            record["privacy_unclipped_share_noised"] = self.clip.update(
                [n > clip for n in norms], self.cfg.seed, round_
            )
            record["privacy_next_clip_norm"] = self.clip.value
        return private, record

    # ------------------------------------------------------------------------------------------- a round
    def _check(
        self,
        replies: list[Message],
        chosen: list[int],
        nodes: dict[int, int],
        round_: int,
        reference: dict[str, torch.Tensor],
    ) -> tuple[dict[int, tuple[dict, MetricRecord]], dict[int, str]]:
        by_node = {node: client for client, node in nodes.items()}
        accepted, failed = {}, {}
        for reply in replies:
            client = by_node.get(reply.metadata.src_node_id, -1)
            self.messages.record("from_client", reply, round_, client)
            if reply.has_error():
                failed[client] = f"client error: {reply.error.reason}"
                continue
            try:
                if "arrays" not in reply.content or "metrics" not in reply.content:
                    raise WeightsError("reply lacks 'arrays' or 'metrics'")
                if self.privacy.mode == "client" and "update_norm" not in reply.content["metrics"]:
                    raise WeightsError("no update_norm: the client did not clip its update (privacy.mode=client)")
                tensors = decode(reply.content["arrays"], self.cfg.transfer)
                check_update(tensors, reference, self.task.shared_keys)
                if self.cfg.transfer == "bfloat16":  # a change against what was sent: rebuild the weights
                    tensors = {k: reference[k] + tensors[k] for k in tensors}
            except WeightsError as err:
                failed[client] = f"rejected update: {err}"
                continue
            # What the server can see of each client: the length of its change (what clip_norm is chosen from).
            received = update_norm({k: tensors[k] - reference[k] for k in reference})
            accepted[client] = (tensors, MetricRecord({**dict(reply.content["metrics"]), "received_norm": received}))
        for client in chosen:
            if client not in accepted and client not in failed:
                failed[client] = f"no reply within {self.cfg.round_timeout_s:.0f} s"
        for client, reason in sorted(failed.items()):
            log.warning("round %d: client %d left out: %s", round_, client, reason)
            self.records.write({"kind": "failure", "round": round_, "client": client, "reason": reason})
        return accepted, failed

    def _round_info(self, round_: int, global_step: int, sampled: int) -> ConfigRecord:
        return ConfigRecord(
            {
                "round": round_,
                "global_step": global_step,
                "sampled": sampled,
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
            "update_noise_multiplier": self.update_noise,
            "delta": self.privacy.delta if self.accountant is not None else None,
            "epsilon": self.accountant.epsilon() if self.accountant is not None else math.inf,
            "accounted_rounds": self.accountant.rounds if self.accountant is not None else 0,
            "target_epsilon": self.privacy.target_epsilon,
        }

    def run(self) -> dict:
        start, global_step, state = self._restore()
        arrays = {k: state[k].to(torch.float32) for k in self.task.shared_keys}
        self.task.state.update(state)
        nodes = identify_clients(
            self.grid, self.num_clients, self.cfg.federation.connect_timeout_s, self.cfg.round_timeout_s
        )
        started = time.monotonic()
        clock = RoundClock(start + 1, self.cfg.num_rounds)
        stopped, stop_reason = None, None
        if start == 0 and self.task.evaluate is not None:
            first = self.task.evaluate({**self.task.state, **arrays})
            self.records.write({"kind": "eval", "round": 0, **first})
            log.info("round 0 (initial model): %s", _brief(first))
        for round_ in range(start + 1, self.cfg.num_rounds + 1):
            if self.accountant is not None and self.accountant.next_round_exceeds():
                if self.saved_round < round_ - 1:
                    self._checkpoint(round_checkpoint(self.out, round_ - 1), round_ - 1, global_step, arrays)
                    self.saved_round = round_ - 1
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
            chosen = self._sample(round_)
            self.strategy.begin_round(encode(arrays, "float32"))
            payload = encode(arrays, self.cfg.transfer)
            outgoing = []
            for client in chosen:
                message = Message(
                    RecordDict(
                        {
                            "arrays": payload,
                            "config": config_to_record(self.sent_cfg),
                            "round": self._round_info(round_, global_step, len(chosen)),
                        }
                    ),
                    dst_node_id=nodes[client],
                    message_type=self.task.message_type,
                    group_id=str(round_),
                )
                self.messages.record("to_client", message, round_, client)
                outgoing.append(message)
            round_started = time.monotonic()
            replies = list(self.grid.send_and_receive(outgoing, timeout=self.cfg.round_timeout_s))
            accepted, failed = self._check(replies, chosen, nodes, round_, arrays)
            if len(accepted) < self.min_required:
                if self.saved_round < round_ - 1:
                    self._checkpoint(round_checkpoint(self.out, round_ - 1), round_ - 1, global_step, arrays)
                raise RoundError(
                    f"round {round_}: {len(accepted)} of {len(chosen)} clients replied usable updates, fewer than "
                    f"strategy.min_clients={self.min_required} "
                    f"({'; '.join(f'client {c}: {r}' for c, r in failed.items())}). "
                    f"The state after round {round_ - 1} is checkpointed; fix the clients and continue with --resume"
                )
            if self.privacy.audit_coordinates:
                if self.audit is None:
                    self.audit = UpdateAudit(self.out / "audit", arrays, self.privacy.audit_coordinates, self.cfg.seed)
                self.audit.write(round_, {c: {k: t[k] - arrays[k] for k in arrays} for c, (t, _) in accepted.items()})
            privacy_row: dict[str, float] = {}
            if self.privacy.mode != "none":
                accepted, privacy_row = self._privatise(accepted, arrays, round_, len(chosen))
            # Equal weights under privacy: weighting by examples would let one client's weight exceed the bound.
            weigh = (lambda m: MetricRecord({**dict(m), "num-examples": 1})) if privacy_row else (lambda m: m)
            ordered = [
                Message(
                    RecordDict({"arrays": encode(t, "float32"), "metrics": weigh(m)}),
                    dst_node_id=0,
                    message_type="train",
                )
                for _, (t, m) in sorted(accepted.items())
            ]
            new, aggregated = self.strategy.aggregate(round_, ordered, {k: np.dtype(np.float32) for k in arrays})
            new_arrays = {k: torch.from_numpy(a.numpy().copy()) for k, a in new.items()}
            step_stats = server_step(arrays, new_arrays, [(t, float(m["num-examples"])) for t, m in accepted.values()])
            arrays = new_arrays
            if self.accountant is not None:
                # Mode client: only the clients that replied added their noise shares.
                shares = len(accepted) if self.privacy.mode == "client" else None
                epsilon = self.accountant.spend_round(shares)
                privacy_row.update(privacy_epsilon=epsilon, privacy_delta=self.privacy.delta)
            global_step += max(int(m.get("train_steps", self.cfg.local_steps)) for _, m in accepted.values())
            for _client, (_, metrics) in sorted(accepted.items()):  # metrics carry the client's index
                self.records.write({"kind": "client", "round": round_, **dict(metrics)})
            row = {
                "kind": "train",
                "round": round_,
                "clients": len(accepted),
                "failed": len(failed),
                "global_step": global_step,
                "seconds": round(time.monotonic() - round_started, 3),
                **step_stats,
                **privacy_row,
                **{
                    k: v
                    for k, v in dict(aggregated).items()
                    if k not in ("client", "update_norm", "clipped", "received_norm")
                },
            }
            self.records.write(row)
            log.info(
                "round %d/%d (%s): %d clients, %s",
                round_,
                self.cfg.num_rounds,
                clock.status(round_),
                len(accepted),
                _brief({**dict(aggregated), **step_stats, **privacy_row}),
            )
            if self.task.evaluate is not None and (
                round_ % self.cfg.evaluate_every == 0 or round_ == self.cfg.num_rounds
            ):
                result = self.task.evaluate({**self.task.state, **arrays})
                self.records.write({"kind": "eval", "round": round_, **result})
                log.info("round %d server evaluation: %s", round_, _brief(result))
                if self._improves(result):
                    self.best = {
                        "round": round_,
                        **{k: result[k] for k in (self.task.best_key, "loss", "gain_nats") if k in result},
                    }
                    self._checkpoint(self.out / CHECKPOINTS / "best.pt", round_, global_step, arrays)
            if round_ % self.cfg.checkpoint_every == 0 or round_ == self.cfg.num_rounds:
                self._checkpoint(round_checkpoint(self.out, round_), round_, global_step, arrays)
                self.saved_round = round_
            if round_ == self.cfg.num_rounds:
                self._checkpoint(self.out / CHECKPOINTS / "final.pt", round_, global_step, arrays)
            elif (reason := stop_requested(self.out)) is not None:
                if self.saved_round < round_:
                    self._checkpoint(round_checkpoint(self.out, round_), round_, global_step, arrays)
                    self.saved_round = round_
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
            "final_checkpoint": None if stopped else str(self.out / CHECKPOINTS / "final.pt"),
        }


def server_step(
    sent: dict[str, torch.Tensor], new: dict[str, torch.Tensor], clients: list[tuple[dict[str, torch.Tensor], float]]
) -> dict[str, float]:
    """How the server's step (new - sent) compares with the clients' mean change (weighted by their examples, the
    step FedAvg would take): both norms, their ratio and the cosine between them. FedAvg gives ratio 1, cosine 1;
    a server optimizer far from that is not following its clients."""
    total = sum(weight for _, weight in clients) or 1.0
    step_sq = mean_sq = dot = 0.0
    for key, before in sent.items():
        step = (new[key] - before).double()
        mean = sum((t[key] - before).double() * (weight / total) for t, weight in clients)
        step_sq += float((step * step).sum())
        mean_sq += float((mean * mean).sum())
        dot += float((step * mean).sum())
    step_norm, mean_norm = math.sqrt(step_sq), math.sqrt(mean_sq)
    return {
        "server_step_norm": step_norm,
        "client_change_norm": mean_norm,
        "step_ratio": step_norm / mean_norm if mean_norm > 0 else 0.0,
        "step_cosine": dot / (step_norm * mean_norm) if step_norm > 0 and mean_norm > 0 else 0.0,
    }


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
