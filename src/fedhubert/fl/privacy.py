"""Client-level differential privacy of the federated round loop: clipping of each client's update, Gaussian noise
on their mean, and the (epsilon, delta) the run has spent, from Flower's RDP accountant (`flwr.serverapp.
RdpAccountant`, backed by Google's dp-accounting).

The mechanism is DP-FedAvg's (McMahan et al., 2018), as Flower's `DifferentialPrivacyServerSideFixedClipping`
applies it: each sampled client's change (its weights minus the weights sent) is scaled to an L2 norm of at most
`clip_norm` over all shared tensors; the changes are averaged with equal weights (not by examples, which would
let one client's weight exceed the bound); Gaussian noise of standard deviation `noise_multiplier * clip_norm / m`
is added to the mean of the m replies. The server optimiser (FedAvg, FedAdam, FedYogi) then works on that noisy
mean, which is post-processing and costs no privacy. Each client's noise share, of standard deviation
`noise_multiplier * clip_norm / sqrt(m)`, is drawn from a generator seeded by (seed, round, client), so a resumed run
adds exactly the noise an uninterrupted one does.

Accounting: one Gaussian release per round. With every client in every round (`strategy.fraction` 1) there is no
amplification by sampling and neighbouring federations differ by adding or removing one client (sensitivity
`clip_norm`). With `strategy.fraction` < 1 the loop samples a fixed number of clients without replacement; the
accountant then uses replace-one neighbours, under which the sum of clipped changes moves by up to 2 `clip_norm`,
so the event's noise multiplier is half the configured one.

Mode `client` moves both steps to the clients (distributed DP): each client clips its own change and adds its noise
share before replying, so the sum of the m replies carries the same noise as in mode `server`. If only k < m clients
reply, the sum carries k shares, and the round is accounted with the noise multiplier scaled by sqrt(k / m).

What mode `server` protects: a client's whole contribution to the released models, against anyone who sees the
models the server releases (checkpoints, exports, the weights sent in later rounds). What it does not: the updates on
the wire and the server itself see each client's update before noise (it trusts the server). Mode `client` also
bounds what one reply reveals (clipped, with a noise share of standard deviation z C / sqrt(m)), but a share alone
is weak local noise: against a curious server it is the sum that is protected, and only secure aggregation would
hide the single replies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig as AccountingConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from fedhubert.errors import ConfigError
from fedhubert.fl.config import PrivacyConfig


def check_settings(privacy: PrivacyConfig, num_clients: int, sampled: int) -> None:
    """Settings that make no sense stop the run before it starts (`sampled`: clients per round)."""
    if privacy.mode == "none":
        return
    if privacy.adaptive_clipping and privacy.noise_multiplier:  # null: checked once chosen
        stddev = count_stddev(privacy, sampled)
        if privacy.noise_multiplier >= 2 * stddev:
            raise ConfigError(
                f"privacy.adaptive_clipping with noise_multiplier {privacy.noise_multiplier:g} needs "
                f"privacy.clipped_count_stddev above {privacy.noise_multiplier / 2:g} (it is {stddev:g}"
                f"{'' if privacy.clipped_count_stddev is not None else f': {sampled} sampled clients / 20'}): the "
                "count's noise takes part of the budget, and must leave some for the updates"
            )
    if privacy.clip_norm is None:
        raise ConfigError(
            f"privacy.mode={privacy.mode} needs privacy.clip_norm (noise without clipping bounds nothing): set it, "
            "e.g. privacy.clip_norm=1.0, after looking at the update norms a run without noise logs"
        )
    if privacy.noise_multiplier is None and privacy.target_epsilon is None:
        raise ConfigError(
            "privacy.noise_multiplier=null chooses the noise for privacy.target_epsilon, which is not set: set it "
            "(e.g. privacy.target_epsilon=8), or give privacy.noise_multiplier a value"
        )
    if privacy.target_epsilon is not None and privacy.noise_multiplier == 0:
        raise ConfigError(
            "privacy.target_epsilon needs privacy.noise_multiplier > 0 (without noise epsilon is infinite)"
        )
    if (privacy.noise_multiplier is None or privacy.noise_multiplier > 0) and privacy.delta >= 1 / num_clients:
        raise ConfigError(
            f"privacy.delta={privacy.delta:g} is not below 1/{num_clients} clients: such a delta allows leaking one "
            f"client outright; use e.g. privacy.delta={0.1 / num_clients:.1g}"
        )


def clip_update(
    change: dict[str, torch.Tensor], clip_norm: float, norm: float | None = None
) -> tuple[dict[str, torch.Tensor], float]:
    """The change scaled to an L2 norm of at most `clip_norm` over all its tensors, and its norm before (`norm`:
    that norm, when the caller has it already)."""
    norm = update_norm(change) if norm is None else norm
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: t * scale for k, t in change.items()}, norm


def clip_per_layer(change: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], bool]:
    """Each tensor scaled to at most clip_norm x sqrt(its share of the parameters): the bounds' squares sum to
    clip_norm^2, so the whole change stays within clip_norm (the sensitivity, and the accounting, are unchanged)
    while a layer with large changes cannot crowd out the others. Returns the change and whether any was scaled."""
    total = sum(t.numel() for t in change.values())
    clipped, any_scaled = {}, False
    for key, tensor in change.items():
        bound = clip_norm * math.sqrt(tensor.numel() / total)
        norm = float(tensor.double().norm())
        scale = min(1.0, bound / norm) if norm > 0 else 1.0
        any_scaled |= scale < 1.0
        clipped[key] = tensor * scale
    return clipped, any_scaled


def count_stddev(privacy: PrivacyConfig, sampled: int) -> float:
    return privacy.clipped_count_stddev if privacy.clipped_count_stddev is not None else sampled / 20


def update_noise_multiplier(privacy: PrivacyConfig, sampled: int) -> float:
    """The noise multiplier of the updates: `noise_multiplier`, or with adaptive clipping what is left of it once the
    count of unclipped updates has its noise (Andrew et al. 2021, Theorem 1, as Flower computes it), so that the two
    releases together cost what one Gaussian release of `noise_multiplier` does."""
    if not privacy.adaptive_clipping or privacy.noise_multiplier == 0:
        return privacy.noise_multiplier
    _, multiplier = compute_adaptive_noise_params(privacy.noise_multiplier, sampled, count_stddev(privacy, sampled))
    return multiplier


def privatise_change(
    change: dict[str, torch.Tensor],
    clip: float,
    noise_multiplier: float,
    sampled: int,
    seed: int,
    round_: int,
    client: int,
    per_layer: bool = False,
    norm: float | None = None,
) -> tuple[dict[str, torch.Tensor], float, bool]:
    """One client's change clipped to `clip` (as a whole, or `per_layer`) plus its share of the round's noise (one
    of `sampled` replies, noise `noise_multiplier * clip` on their sum); its norm before clipping (`norm`: given
    when the caller has computed it); whether it was clipped."""
    if per_layer:
        norm = update_norm(change) if norm is None else norm
        clipped, was_clipped = clip_per_layer(change, clip)
    else:
        clipped, norm = clip_update(change, clip, norm)
        was_clipped = norm > clip
    share_std = noise_multiplier * clip / math.sqrt(sampled)
    if share_std > 0:
        noise = noise_share(clipped, share_std, seed, round_, client)
        clipped = {k: clipped[k] + noise[k] for k in clipped}
    return clipped, norm, was_clipped


def update_norm(change: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in change.values()))


def noise_share(
    like: dict[str, torch.Tensor], std: float, seed: int, round_: int, client: int
) -> dict[str, torch.Tensor]:
    """Gaussian noise of standard deviation `std` for every tensor of `like`, the same for the same seed, round and
    client."""
    entropy = int(np.random.SeedSequence([seed, round_, client]).generate_state(1, np.uint64)[0])
    generator = torch.Generator().manual_seed(entropy & 0x7FFF_FFFF_FFFF_FFFF)
    return {k: torch.randn(t.shape, generator=generator, dtype=torch.float32) * std for k, t in like.items()}


@dataclass
class RoundPrivacy:
    """What one round's privacy step reports (metrics.jsonl)."""

    clip_norm: float
    clipped_fraction: float
    update_norm_median: float
    update_norm_max: float
    noise_std: float  # of the noise on the mean

    def record(self) -> dict[str, float]:
        return {f"privacy_{k}": v for k, v in self.__dict__.items()}


class ClipBound:
    """The clipping bound of each round: `clip_norm`, or with `adaptive_clipping` a bound that moves geometrically
    towards the `target_quantile` of the update norms: C <- C exp(-lr (b - target)), b the noised share of
    unclipped updates (Andrew et al. 2021). Flower 1.41's adaptive-clipping wrappers count the clipped updates in
    this formula instead, which moves the bound away from the quantile; this follows the paper."""

    def __init__(self, privacy: PrivacyConfig, sampled: int):
        self.privacy, self.value = privacy, float(privacy.clip_norm)
        self.count_stddev = count_stddev(privacy, sampled) if privacy.noise_multiplier > 0 else 0.0

    def update(self, clipped: list[bool], seed: int, round_: int) -> float:
        """Move the bound after a round whose replies were `clipped` or not; returns the noised unclipped share."""
        unclipped = sum(not c for c in clipped)
        noise = np.random.default_rng([seed, round_, 0xC119]).normal(0.0, self.count_stddev)
        share = (unclipped + noise) / len(clipped)
        if self.privacy.adaptive_clipping:
            self.value *= math.exp(-self.privacy.clip_learning_rate * (share - self.privacy.target_quantile))
        return share


def noise_for_target(privacy: PrivacyConfig, num_clients: int, sampled: int, rounds: int) -> float:
    """The smallest noise multiplier (to 0.1%) whose `rounds` rounds, `sampled` of `num_clients` clients each, spend
    at most `privacy.target_epsilon` at `privacy.delta`, by bisection on the run's own accountant (`Accountant`, the
    same neighbouring relation and sampling)."""
    target = privacy.target_epsilon
    if target is None:
        raise ConfigError("choosing the noise multiplier needs privacy.target_epsilon")

    def epsilon(z: float) -> float:
        accountant = Accountant(replace(privacy, noise_multiplier=z, target_epsilon=None), num_clients, sampled)
        accountant._compose(1.0, rounds)
        return accountant.epsilon()

    high = 1.0
    while epsilon(high) > target:
        high *= 2
        if high > 1e6:
            raise ConfigError(
                f"no noise multiplier up to 1e6 keeps epsilon within privacy.target_epsilon={target:g} over {rounds} "
                f"rounds of {sampled} of {num_clients} clients at delta {privacy.delta:g}: raise the target or delta"
            )
    low = high / 2
    while epsilon(low) <= target and low > 1e-3:
        high, low = low, low / 2
    while high / low > 1.001:
        middle = math.sqrt(low * high)
        if epsilon(middle) <= target:
            high = middle
        else:
            low = middle
    return high


class Accountant:
    """The run's (epsilon, delta) so far, one Gaussian release per round with noise.

    Each round costs the same whatever the run's length: the RDP of a round is added to the spent total, and to a
    second total that is always one standard round ahead, so whether the next round would exceed
    `privacy.target_epsilon` is read off it instead of replaying every past round (as Flower's `would_exceed`
    does, quadratic over a run). The state is a ledger of runs of equal rounds (noise scale, count)."""

    def __init__(self, privacy: PrivacyConfig, num_clients: int, sampled: int):
        self.noise_multiplier = privacy.noise_multiplier
        self.sampled, self.num_clients = sampled, num_clients
        amplified = sampled < num_clients
        self.config = AccountingConfig(
            target_delta=privacy.delta,
            population_size=num_clients,
            neighboring_relation=NeighboringRelation.REPLACE_ONE
            if amplified
            else NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.WITHOUT_REPLACEMENT if amplified else SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=privacy.target_epsilon,
        )
        # Replace-one neighbours move the sum of clipped changes by up to 2 clip_norm (module docstring).
        self.halve = 2 if amplified else 1
        self.event = self._event(1.0)
        self._reset([])

    def _event(self, noise_scale: float) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(
            noise_multiplier=self.noise_multiplier * noise_scale / self.halve,
            sample_size=self.sampled,
            population_size=self.num_clients,
        )

    def _reset(self, ledger: list[list[float]]) -> None:
        # Each compose evaluates the RDP of a sampled Gaussian (~0.15 s for sampling without replacement), so the
        # copy one round ahead is kept only where a target needs it.
        self.spent = RdpAccountant(self.config)
        self.ahead = RdpAccountant(self.config) if self.config.max_epsilon is not None else None
        if self.ahead is not None:
            self.ahead.compose(self.event)
        self.ledger: list[list[float]] = []
        for scale, count in ledger:
            self._compose(float(scale), int(count))

    def _compose(self, scale: float, count: int = 1) -> None:
        event = self.event if scale == 1.0 else self._event(scale)
        self.spent.compose(event, count)
        if self.ahead is not None:
            self.ahead.compose(event, count)
        if self.ledger and self.ledger[-1][0] == scale:
            self.ledger[-1][1] += count
        else:
            self.ledger.append([scale, count])

    @property
    def rounds(self) -> int:
        return int(sum(count for _, count in self.ledger))

    def epsilon(self) -> float:
        return self.spent.get_privacy_spent().epsilon if self.rounds else 0.0

    def next_round_exceeds(self) -> bool:
        # `ahead` exists exactly when there is a target (`_reset`).
        return self.ahead is not None and self.ahead.get_epsilon(self.config.target_delta) > self.config.max_epsilon

    def spend_round(self, noise_shares: int | None = None) -> float:
        """Account one round; `noise_shares` < sampled (mode client, some clients did not reply) means less noise."""
        shares = self.sampled if noise_shares is None else noise_shares
        self._compose(1.0 if shares == self.sampled else math.sqrt(shares / self.sampled))
        return self.epsilon()

    def state(self) -> dict:
        return {"ledger": [list(entry) for entry in self.ledger], "config": self.spent.state_dict()["config"]}

    def load_state(self, state: dict) -> None:
        """Restore `state()`, or the state of Flower's RdpAccountant that earlier versions saved."""
        saved, now = state.get("config"), self.spent.state_dict()["config"]
        if saved != now:
            raise ConfigError(
                f"the checkpoint's privacy accountant was made for {saved} and this run's is {now}: resume with the "
                "same privacy settings and the same clients available (population_size)"
            )
        if "ledger" in state:
            self._reset(state["ledger"])
            return
        ledger = []
        for composition in state["compositions"]:
            scale = composition["event"]["noise_multiplier"] * self.halve / self.noise_multiplier
            ledger.append([1.0 if math.isclose(scale, 1.0) else scale, composition["count"]])
        self._reset(ledger)


class UpdateAudit:
    """What the server receives, kept for audits and leakage studies (`privacy.audit_coordinates`): for every reply,
    the same `size` coordinates of the client's change (a fixed random subset of the shared weights, chosen by the
    seed), one file per round: `audit/round_<r>.npz` with `clients` and `changes` (clients x size)."""

    def __init__(self, folder: Path, reference: dict[str, torch.Tensor], size: int, seed: int):
        self.folder, self.keys = folder, sorted(reference)
        total = sum(reference[k].numel() for k in self.keys)
        rng = np.random.default_rng([seed, 0xA0D17])
        self.index = torch.from_numpy(np.sort(rng.choice(total, size=min(size, total), replace=False)))

    def coordinates(self, change: dict[str, torch.Tensor]) -> np.ndarray:
        flat = torch.cat([change[k].reshape(-1).float() for k in self.keys])
        return flat[self.index].numpy()

    def write(self, round_: int, coordinates: dict[int, np.ndarray]) -> None:
        """One round's file from each client's `coordinates` (taken from its change as it arrived)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        clients = sorted(coordinates)
        with (self.folder / f"round_{round_:05d}.npz").open("wb") as handle:
            np.savez(
                handle,
                clients=np.asarray(clients, dtype=np.int64),
                changes=np.stack([coordinates[c] for c in clients]),
            )
