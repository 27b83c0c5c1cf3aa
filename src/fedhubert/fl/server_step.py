"""The server's step against its clients' mean change, and a warning when a server optimiser does not follow them.

FedAvg's step is the clients' weighted mean change (ratio 1, cosine 1). An adaptive server optimiser (FedAdam,
FedYogi) moves each weight by about eta a round whatever the clients did, so a poorly chosen eta/tau shows as a step
far smaller or larger than the clients' change: in benchmarks/server_opt.py the cells that learnt moved the model by
STEP_RATIO_RANGE of it, the ones with steps outside it did not learn within the run.
"""

from __future__ import annotations

import math
import statistics

import torch

STEP_RATIO_RANGE = (0.2, 5.0)
WATCH_ROUNDS = 3  # the median step ratio over the first rounds a run (or resumed run) takes decides


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
    """Collects the step ratio of the first WATCH_ROUNDS rounds and, once, says what is wrong if their median lies
    outside STEP_RATIO_RANGE (FedAvg's step is the clients' change by construction: nothing to watch)."""

    def __init__(self, strategy: str, eta: float, tau: float | None) -> None:
        self.strategy, self.eta, self.tau = strategy, eta, tau
        self.ratios: list[float] = []
        self.done = strategy == "fedavg"

    def add(self, ratio: float) -> str | None:
        """The warning to log after this round's ratio, or None."""
        if self.done:
            return None
        self.ratios.append(ratio)
        if len(self.ratios) < WATCH_ROUNDS:
            return None
        self.done = True
        median = statistics.median(self.ratios)
        low, high = STEP_RATIO_RANGE
        if low <= median <= high:
            return None
        rates = f"strategy.eta={self.eta:g}" + (f", strategy.tau={self.tau:g}" if self.tau is not None else "")
        direction = "raise" if median < low else "lower"
        return (
            f"{self.strategy} with {rates} moved the model by {100 * median:.0f}% of the clients' mean change "
            f"(median over {WATCH_ROUNDS} rounds; the settings that learnt in benchmarks/server_opt.py "
            f"moved it by {100 * low:.0f}-{100 * high:.0f}%): {direction} strategy.eta, or leave eta/tau null for "
            f"the strategy's measured preset"
        )
