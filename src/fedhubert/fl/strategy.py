"""Flower's FedAvg, FedAvgM, FedAdam and FedYogi as the aggregation step of fedhubert's server loop, made resumable.

The loop (`fedhubert.fl.rounds.FederatedRun`) samples clients by partition id and sends messages itself, then hands
the replies of a round to the strategy's own `aggregate_train`; Flower's sampling settings (`fraction_train`,
`min_train_nodes`, ...) serve only its own `configure_train`/`configure_evaluate`, which the loop never calls, so
they are left at Flower's defaults. What these classes add:
- `begin_round(arrays)` records the arrays sent this round (what FedOpt's and FedAvgM's `configure_train` record),
  so that FedAvgM/FedAdam/FedYogi compute the pseudo-gradient against them;
- the result keeps each array's dtype: Flower's FedAdam/FedYogi multiply by a NumPy float64 scalar, which turns
  float32 weights into float64 (twice the bytes on the wire from then on);
- `state()` / `load_state()` carry the server optimiser's moments (FedAvgM: its momentum), so that a resumed run
  continues exactly (the round number, which FedAdam's bias correction uses, is the loop's).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi
from flwr.serverapp.strategy.fedopt import FedOpt

from fedhubert.fl.config import StrategyConfig


class _Resumable:
    def begin_round(self, arrays: dict[str, torch.Tensor]) -> None:
        """`arrays`: the float32 weights sent this round, shared (not copied) with FedOpt, which never writes them."""
        if isinstance(self, FedOpt):
            self.current_arrays = {k: t.numpy() for k, t in arrays.items()}
        elif isinstance(self, FedAvgM):
            self.current_arrays = ArrayRecord({k: Array(t.numpy()) for k, t in arrays.items()})

    def aggregate(
        self, server_round: int, replies: Iterable[Message], dtypes: dict[str, np.dtype]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = ArrayRecord({k: Array(np.asarray(a.numpy(), dtype=dtypes[k])) for k, a in arrays.items()})
        return arrays, metrics

    def state(self) -> dict:
        if isinstance(self, FedAvgM):
            if self.momentum_vector is None:
                return {}
            return {"momentum": [torch.from_numpy(np.array(v)) for v in self.momentum_vector]}
        if not isinstance(self, FedOpt) or self.m_t is None:
            return {}
        return {
            "m_t": {k: torch.from_numpy(np.array(v)) for k, v in self.m_t.items()},
            "v_t": {k: torch.from_numpy(np.array(v)) for k, v in self.v_t.items()},
        }

    def load_state(self, state: dict) -> None:
        """Restore the moments; a state saved before the first aggregation (round 0) has none to restore."""
        if isinstance(self, FedAvgM) and "momentum" in state:
            self.momentum_vector = [v.numpy() for v in state["momentum"]]
        if isinstance(self, FedOpt) and "m_t" in state:
            self.m_t = {k: v.numpy() for k, v in state["m_t"].items()}
            self.v_t = {k: v.numpy() for k, v in state["v_t"].items()}


class ResumableFedAvg(_Resumable, FedAvg):
    pass


class ResumableFedAvgM(_Resumable, FedAvgM):
    pass


class ResumableFedAdam(_Resumable, FedAdam):
    pass


class ResumableFedYogi(_Resumable, FedYogi):
    pass


def make_strategy(cfg: StrategyConfig) -> _Resumable:
    """The configured strategy, used for its aggregation only (`strategy.fraction` and `strategy.min_clients` are
    the loop's)."""
    eta, tau = cfg.server_rates()
    if cfg.name == "fedavg":
        return ResumableFedAvg()
    if cfg.name == "fedavgm":
        return ResumableFedAvgM(server_learning_rate=eta, server_momentum=cfg.momentum)
    cls = ResumableFedAdam if cfg.name == "fedadam" else ResumableFedYogi
    return cls(eta=eta, beta_1=cfg.first_moment(), beta_2=cfg.beta_2, tau=tau)
