"""Streaming aggregation: each client's change is checked, clipped and noised per the privacy mode, and added to a
running weighted sum as its reply arrives, so the server holds a few model copies whatever the number of replies.

The mean it gives is the one Flower's FedAvg computes from all replies at once (weighted by `num-examples`, or
with equal weights under privacy, so that no client's weight exceeds the bound), to float tolerance; the
strategy's server update (FedAvg, FedAdam, FedYogi) is then applied to it (`fedhubert.fl.rounds`). Replies arrive
in no fixed order, so the sums are kept in float64: the float32 mean then does not depend on the order (a
difference would need two orders' float64 sums to straddle a float32 rounding boundary), and a resumed run ends
with the same weights as an uninterrupted one.

Privacy mode server: a change is clipped here and its share of the noise is drawn from the same seed as before
(seed, round, client); the shares' standard deviation depends on how many replies are accepted, which is known
only at the end, so the unit-variance draws are summed and scaled once the round is complete (the same sum).
Mode client: the clients clipped and noised; their reported norms are gathered. The metrics are averaged with
the same weights, as Flower's `aggregate_metricrecords` does (the weighting key left out), each over the replies
that report it (a client that skipped its validation reports no validation metrics, rather than zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedhubert.fl.config import PrivacyConfig
from fedhubert.fl.privacy import RoundPrivacy, UpdateAudit, clip_per_layer, clip_update, noise_share

WEIGHT_KEY = "num-examples"


@dataclass(frozen=True)
class Aggregate:
    """A round's aggregate: the mean change, the mean metrics, and what the privacy step saw."""

    change: dict[str, torch.Tensor]
    metrics: dict[str, float | list[float]]
    replies: int
    norms: list[float]  # each accepted update's norm before clipping (privacy), in arrival order
    clipped: list[bool]


class StreamingMean:
    """The running weighted sum of one round's client changes (against `reference`, the weights sent)."""

    def __init__(
        self,
        reference: dict[str, torch.Tensor],
        privacy: PrivacyConfig,
        *,
        clip: float | None,
        noise_multiplier: float,
        seed: int,
        round_: int,
        audit: UpdateAudit | None = None,
    ):
        self.reference, self.privacy = reference, privacy
        self.clip, self.noise_multiplier = clip, noise_multiplier
        self.seed, self.round = seed, round_
        self.audit = audit
        self.sum = {k: torch.zeros_like(t, dtype=torch.float64) for k, t in reference.items()}
        self.noise = (
            {k: torch.zeros_like(t, dtype=torch.float64) for k, t in reference.items()}
            if privacy.mode == "server" and noise_multiplier > 0
            else None
        )
        self.weight = 0.0
        self.metric_sums: dict[str, float | list[float]] = {}
        self.metric_weights: dict[str, float] = {}  # a key's mean is over the replies that carry it
        self.replies = 0
        self.norms: list[float] = []
        self.clipped: list[bool] = []
        self.audited: dict[int, np.ndarray] = {}

    def add(self, client: int, change: dict[str, torch.Tensor], metrics: dict, norm: float) -> dict:
        """Fold one accepted reply in: `change` (trained - sent, as received), its `metrics`, and `norm`, the norm of
        `change`. Returns what the privacy step adds to the client's metrics (mode server: its norm and whether it
        was clipped)."""
        if self.audit is not None:
            self.audited[client] = self.audit.coordinates(change)
        extra: dict = {}
        if self.privacy.mode == "server":
            if self.privacy.per_layer_clipping:
                change, was_clipped = clip_per_layer(change, self.clip)
            else:
                change, norm = clip_update(change, self.clip, norm)
                was_clipped = norm > self.clip
            if self.noise is not None:
                for key, draw in noise_share(change, 1.0, self.seed, self.round, client).items():
                    self.noise[key] += draw.double()
            extra = {"update_norm": norm, "clipped": int(was_clipped)}
            self.norms.append(norm)
            self.clipped.append(was_clipped)
        elif self.privacy.mode == "client":
            self.norms.append(float(metrics["update_norm"]))
            self.clipped.append(bool(metrics["clipped"]))
        weight = 1.0 if self.privacy.mode != "none" else float(metrics[WEIGHT_KEY])
        for key, tensor in change.items():
            self.sum[key].add_(tensor.double(), alpha=weight)
        self._add_metrics({**metrics, **extra}, weight)
        self.weight += weight
        self.replies += 1
        return extra

    def _add_metrics(self, metrics: dict, weight: float) -> None:
        for key, value in metrics.items():
            if key == WEIGHT_KEY or isinstance(value, (str, bytes)):
                continue
            if isinstance(value, list):
                scaled = [float(v) * weight for v in value]
                old = self.metric_sums.get(key)
                self.metric_sums[key] = scaled if old is None else [a + b for a, b in zip(old, scaled, strict=True)]
            else:
                self.metric_sums[key] = float(self.metric_sums.get(key, 0.0)) + float(value) * weight
            self.metric_weights[key] = self.metric_weights.get(key, 0.0) + weight

    def noise_std(self, sampled: int) -> float:
        """The standard deviation of the noise on the mean: m shares of std z C / sqrt(m) summed, over the k replies
        (k = m in mode server, where the shares are drawn here)."""
        shares = self.replies if self.privacy.mode == "server" else sampled
        return self.noise_multiplier * self.clip * math.sqrt(self.replies / shares) / self.replies

    def result(self) -> Aggregate:
        """The mean change and metrics of the replies folded in (at least one). It consumes the sums, one layer at a
        time (so that at most one float64 copy of the model is held), and can be asked once."""
        if self.sum is None:
            raise RuntimeError("StreamingMean.result() was already taken")
        scale = 1.0 / self.weight
        share_std = self.noise_multiplier * self.clip / math.sqrt(self.replies) if self.noise is not None else 0.0
        change = {}
        for key in list(self.sum):
            total = self.sum.pop(key).mul_(scale)
            if self.noise is not None:
                total += self.noise.pop(key) * (share_std * scale)
            change[key] = total.to(torch.float32)
        self.sum = None
        metrics = {
            k: [v / self.metric_weights[k] for v in value]
            if isinstance(value, list)
            else value / self.metric_weights[k]
            for k, value in self.metric_sums.items()
        }
        return Aggregate(change, metrics, self.replies, self.norms, self.clipped)

    def privacy_report(self, sampled: int) -> RoundPrivacy:
        return RoundPrivacy(
            clip_norm=self.clip,
            clipped_fraction=sum(self.clipped) / self.replies,
            update_norm_median=float(np.median(self.norms)),
            update_norm_max=max(self.norms),
            noise_std=self.noise_std(sampled),
        )
