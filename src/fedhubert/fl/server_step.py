"""The server's step against its clients' mean change, and a warning when a server optimiser does not follow them.

FedAvg's step is the clients' weighted mean change (ratio 1, cosine 1). In benchmarks/server_opt.py
(results/server_opt.json, the learning benchmark's data and compute) the two settings that learnt, FedAvg and FedAdam
without server momentum at eta 1e-2, moved the model by 0.96-1.0x the clients' mean change at a cosine of 0.97-1.0;
every refined cell with a median step ratio of 2.3 or more collapsed onto 1-4 predicted clusters, and every refined
cell with server momentum (FedAdam/FedYogi beta_1 0.9, FedAvgM) turned its step away from the clients' change
(cosine 0.33-0.60) and collapsed; FedAdam's earlier preset (eta 1e-3) moved it by 0.07x and stayed below the
label-frequency baseline (benchmarks/learning.py). STEP_RATIO_RANGE and MIN_COSINE are bounds around what learnt.
"""

from __future__ import annotations

import math
import statistics

import torch

STEP_RATIO_RANGE = (0.2, 2.0)
MIN_COSINE = 0.9
WATCH_ROUNDS = 3  # the medians over the first rounds a run (or resumed run) takes decide


def server_step(
    sent: dict[str, torch.Tensor], new: dict[str, torch.Tensor], mean_change: dict[str, torch.Tensor]
) -> dict[str, float]:
    """How the server's step (new - sent) compares with the clients' mean change (with the aggregation's weights:
    the step FedAvg takes): both norms, their ratio and the cosine between them. FedAvg gives ratio 1, cosine 1;
    a server optimizer far from that is not following its clients."""
    step_sq = mean_sq = dot = 0.0
    for key, before in sent.items():
        step = (new[key] - before).double()
        mean = mean_change[key].double()
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


class StepWatch:
    """Collects the step ratio and cosine of the first WATCH_ROUNDS rounds and, once, says what is wrong if their
    medians lie outside STEP_RATIO_RANGE or below MIN_COSINE (FedAvg's step is the clients' change by construction:
    nothing to watch)."""

    def __init__(self, strategy: str, eta: float, tau: float | None, beta_1: float | None = None) -> None:
        self.strategy, self.eta, self.tau, self.beta_1 = strategy, eta, tau, beta_1
        self.steps: list[tuple[float, float]] = []
        self.done = strategy == "fedavg"

    def add(self, ratio: float, cosine: float = 1.0) -> str | None:
        """The warning to log after this round's step, or None."""
        if self.done:
            return None
        self.steps.append((ratio, cosine))
        if len(self.steps) < WATCH_ROUNDS:
            return None
        self.done = True
        median = statistics.median(r for r, _ in self.steps)
        turned = statistics.median(c for _, c in self.steps)
        low, high = STEP_RATIO_RANGE
        problems = []
        if not low <= median <= high:
            direction = "raise" if median < low else "lower"
            problems.append(
                f"moved the model by {100 * median:.0f}% of the clients' mean change (the settings that learnt in "
                f"benchmarks/server_opt.py: {100 * low:.0f}-{100 * high:.0f}%): {direction} strategy.eta"
            )
        if turned < MIN_COSINE:
            if self.strategy == "fedavgm":
                fix = "lower strategy.momentum"
            elif self.beta_1:
                fix = "lower strategy.beta_1 (0: no server momentum)"
            else:
                fix = "raise strategy.tau (the per-weight normalisation turns it)"
            problems.append(
                f"turned its step away from the clients' mean change (cosine {turned:.2f}; the settings that learnt: "
                f">= {MIN_COSINE:g}): {fix}"
            )
        if not problems:
            return None
        rates = f"strategy.eta={self.eta:g}" + (f", strategy.tau={self.tau:g}" if self.tau is not None else "")
        if self.beta_1 is not None:
            rates += f", strategy.beta_1={self.beta_1:g}"
        return (
            f"{self.strategy} with {rates}, median over {WATCH_ROUNDS} rounds: {'; and '.join(problems)}; or leave "
            "them null for the strategy's measured preset"
        )
