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

What this protects: a client's whole contribution to the released models, against anyone who sees the models the
server releases (checkpoints, exports, the weights sent in later rounds). What it does not: the updates on the wire
and the server itself see each client's update before noise (mode `server` trusts the server).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig as AccountingConfig,
    RdpAccountant,
    SamplingMethod,
)

from fedhubert.errors import ConfigError
from fedhubert.fl.config import PrivacyConfig


def check_settings(privacy: PrivacyConfig, num_clients: int) -> None:
    """Settings that make no sense stop the run before it starts."""
    if privacy.mode == "none":
        return
    if privacy.clip_norm is None:
        raise ConfigError(
            f"privacy.mode={privacy.mode} needs privacy.clip_norm (noise without clipping bounds nothing): set it, "
            "e.g. privacy.clip_norm=1.0, after looking at the update norms a run without noise logs"
        )
    if privacy.target_epsilon is not None and privacy.noise_multiplier == 0:
        raise ConfigError(
            "privacy.target_epsilon needs privacy.noise_multiplier > 0 (without noise epsilon is infinite)"
        )
    if privacy.noise_multiplier > 0 and privacy.delta >= 1 / num_clients:
        raise ConfigError(
            f"privacy.delta={privacy.delta:g} is not below 1/{num_clients} clients: such a delta allows leaking one "
            f"client outright; use e.g. privacy.delta={0.1 / num_clients:.1g}"
        )


def clip_update(change: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """The change scaled to an L2 norm of at most `clip_norm` over all its tensors, and its norm before."""
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in change.values()))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: t * scale for k, t in change.items()}, norm


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


class Accountant:
    """The run's (epsilon, delta) so far, one Gaussian release per round with noise."""

    def __init__(self, privacy: PrivacyConfig, num_clients: int, sampled: int):
        self.noise_multiplier = privacy.noise_multiplier
        self.sampled, self.num_clients = sampled, num_clients
        amplified = sampled < num_clients
        self.accountant = RdpAccountant(
            AccountingConfig(
                target_delta=privacy.delta,
                population_size=num_clients,
                neighboring_relation=NeighboringRelation.REPLACE_ONE
                if amplified
                else NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.WITHOUT_REPLACEMENT if amplified else SamplingMethod.NO_AMPLIFICATION,
                max_epsilon=privacy.target_epsilon,
            )
        )
        # Replace-one neighbours move the sum of clipped changes by up to 2 clip_norm (module docstring).
        self.event = GaussianPrivacyEvent(
            noise_multiplier=privacy.noise_multiplier / (2 if amplified else 1),
            sample_size=sampled,
            population_size=num_clients,
        )

    @property
    def rounds(self) -> int:
        return self.accountant.num_releases

    def epsilon(self) -> float:
        return self.accountant.get_privacy_spent().epsilon if self.rounds else 0.0

    def next_round_exceeds(self) -> bool:
        return self.accountant.config.max_epsilon is not None and self.accountant.would_exceed(self.event)

    def spend_round(self) -> float:
        self.accountant.compose(self.event)
        return self.epsilon()

    def state(self) -> dict:
        return self.accountant.state_dict()

    def load_state(self, state: dict) -> None:
        self.accountant.load_state_dict(state)
