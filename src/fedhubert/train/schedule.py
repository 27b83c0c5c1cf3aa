"""The learning-rate schedule fitted to the run: warm-up and decay measured in the run's own planned updates.

The HuBERT recipe warms up over 32,000 of 250,000 updates. Copied into a run of a few hundred updates, that
schedule peaks at a percent of `lr` and the model barely moves; copied into a longer run, it reaches 0 before
the end. So unless `optim.total_steps` is given, it is the run's planned updates (train-local: `steps`;
federated: rounds x local steps), and unless `optim.warmup_steps` is given, the warm-up is
`optim.warmup_fraction` of it. Explicit values are honoured, with a warning when they do not fit the run. An unset
`optim.lr` is the model preset's (`fedhubert.model.config.PRESET_LR`, passed as `default_lr`): a 0.1 M-parameter
model wants a larger step than HuBERT Base's 5e-4.
"""

from __future__ import annotations

import dataclasses

from fedhubert.train.config import OptimConfig


def fit_schedule(optim: OptimConfig, planned_updates: int, default_lr: float) -> OptimConfig:
    """`optim` with `lr` (`default_lr` when unset), `warmup_steps` and `total_steps` resolved for a run of
    `planned_updates` updates."""
    total = optim.total_steps if optim.total_steps is not None else max(1, planned_updates)
    warmup = (
        optim.warmup_steps
        if optim.warmup_steps is not None
        else min(total - 1, int(round(optim.warmup_fraction * total)))
    )
    return dataclasses.replace(
        optim, lr=optim.lr if optim.lr is not None else default_lr, warmup_steps=max(0, warmup), total_steps=total
    )


def schedule_record(optim: OptimConfig, planned_updates: int, default_lr: float) -> dict:
    """What a run's files record of its schedule: the resolved values and where they came from."""
    fitted = fit_schedule(optim, planned_updates, default_lr)
    return {
        "lr": fitted.lr,
        "lr_from": "config" if optim.lr is not None else "model preset",
        "warmup_steps": fitted.warmup_steps,
        "total_steps": fitted.total_steps,
        "planned_updates": planned_updates,
        "warmup_from": "config" if optim.warmup_steps is not None else f"{optim.warmup_fraction:g} of total_steps",
        "total_from": "config" if optim.total_steps is not None else "planned updates",
    }


def schedule_warnings(optim: OptimConfig, planned_updates: int) -> list[str]:
    """Why the schedule does not fit a run of `planned_updates` updates (empty when it does)."""
    fitted = fit_schedule(optim, planned_updates, default_lr=0.0)  # the rate itself does not matter here
    problems = []
    if fitted.total_steps < planned_updates:
        problems.append(
            f"the learning rate reaches 0 at update {fitted.total_steps} (optim.total_steps) but the run plans "
            f"{planned_updates} updates: the last {planned_updates - fitted.total_steps} change nothing. Leave "
            f"optim.total_steps unset (null) to fit the schedule to the run"
        )
    if fitted.warmup_steps >= planned_updates:
        peak = (planned_updates / fitted.warmup_steps) if fitted.warmup_steps else 1.0
        problems.append(
            f"the learning rate never reaches its peak: the warm-up is {fitted.warmup_steps} updates "
            f"(optim.warmup_steps) and the run plans {planned_updates}, so it tops out at {100 * peak:.1f}% of "
            f"optim.lr. Leave optim.warmup_steps unset (null) to warm up over "
            f"optim.warmup_fraction={optim.warmup_fraction:g} of the run"
        )
    return problems


def describe(record: dict) -> str:
    return (
        f"learning rate {record['lr']:g} ({record['lr_from']}): linear warm-up over {record['warmup_steps']} "
        f"updates "
        f"({record['warmup_from']}), linear decay to 0 at update {record['total_steps']} ({record['total_from']}); "
        f"the run plans {record['planned_updates']} updates"
    )
