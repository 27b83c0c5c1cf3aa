"""The federated tasks of fedhubert's Flower app, and the ServerApp and ClientApp that run them.

A stage declares its task: the ServerApp's main for it and the ClientApp's handlers of the messages that main
sends. `fedhubert.app` lists the stages' tasks and builds the two apps here, so fl/ knows no stage.

A run starts in one of two ways:
- From a fedhubert command (`fedhubert pretrain`, ...), which writes the run folder's records itself and passes
  `managed=true`, `config` (the resolved config.yaml it wrote), `out`, `resume` and `threads`.
- From `flwr run .` in the repository (pyproject.toml's `[tool.flwr.app.config]`): the ServerApp builds the
  stage's config from `config` (a YAML file) and the flat keys the task maps onto config keys
  (`num-server-rounds`, `local-steps`, `fraction-train`, `strategy`, `preset`, `partition`, `kmeans`, `teacher`;
  empty strings and zeros leave the config's value), and writes the same records as the command (config.yaml,
  run.json, logs, metrics, plots) in `out`. Relative paths resolve against the fedhubert checkout that runs the
  ServerApp (`app_root`).

A client is identified by its node's `partition-id` (never by anything process-specific) and reads its own
folder `client_<partition-id>` of the partition. Optional node config keys for deployments: `partition-dir`
(where this node keeps the partition), `work-dir` (where it writes features, labels and local heads) and
`kmeans-dir` (its k-means labels); `fedhubert.app` lists every key a stage's handlers read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedhubert.config import absolute_paths, load_config
from fedhubert.errors import ConfigError, FedhubertError
from fedhubert.fl.local import identify
from fedhubert.fl.nodes import in_simulation
from fedhubert.fl.runtime.actors import ActorPoolChanged, require_restartable
from fedhubert.runlog import CONFIG_FILE, setup_logging, stage_run

log = logging.getLogger("fedhubert")

# Flat run config keys of `flwr run` that hold paths (resolved against `app_root()` when relative).
PATH_KEYS = ("config", "out", "partition", "kmeans", "teacher")
# The flat run config keys the app reads for every task (the stage's own keys are its `run_keys`).
APP_RUN_KEYS = ("task", "config", "out", "resume", "force", "threads", "managed")
# The flat run config keys of every federated training stage (RoundsConfig's) -> config keys; a stage's
# `run_keys` extend them with its own.
ROUNDS_RUN_KEYS = {
    "partition": "partition",
    "kmeans": "kmeans",
    "num-server-rounds": "num_rounds",
    "local-steps": "local_steps",
    "fraction-train": "strategy.fraction",
    "strategy": "strategy.name",
}


@dataclass(frozen=True)
class ServerRun:
    """What the run config asks of a task's ServerApp main."""

    config: Path
    out: Path
    resume: bool
    threads: int  # 0: PyTorch's default


@dataclass(frozen=True)
class FederatedTask:
    """A stage's federated task. `config_cls`, `run_keys`, `owned` and `finish` make it runnable by `flwr run .`
    (without them only its fedhubert command starts it): the stage's config class, the flat run config keys it
    maps onto config keys, the entries it owns in its output folder, and what its command does after the rounds
    (plots), given the config, the output folder and the summary."""

    name: str  # the run config's `task`
    serve: Callable[[Grid, ServerRun], Any]
    handlers: Mapping[str, Callable[[Message, Context], Message]]  # by message type, e.g. "train.distill"
    config_cls: type | None = None
    run_keys: Mapping[str, str] = field(default_factory=dict)
    owned: Sequence[str] = ()
    finish: Callable[[Any, Path, dict], None] | None = None


def app_root() -> Path:
    """Where the relative paths of a `flwr run` resolve: the fedhubert checkout the ServerApp runs from (the
    repository root, which holds configs/ and the data folders made there), else the working folder. The app
    folder `flwr run` was given is not known to the ServerApp: Flower ships a copy of it."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "configs").is_dir() else Path.cwd()


def _is_set(value: object) -> bool:
    """Flower's run config has no null: an empty string or a zero number leaves the config's value."""
    if isinstance(value, bool):
        return value
    return value not in ("", 0, 0.0)


def flat_overrides(task: FederatedTask, run_config: Mapping[str, object], root: Path) -> list[str]:
    """KEY=VALUE overrides of the task's config from the flat run config keys that are set; a key set that this
    task does not read is an error (it would be silently ignored)."""
    known = {*task.run_keys, *APP_RUN_KEYS}
    overrides, unused = [], []
    for key, value in run_config.items():
        if not _is_set(value):
            continue
        if key not in known:
            unused.append(key)
        elif key in task.run_keys:
            if key in PATH_KEYS:
                value = (root / str(value)).resolve()
            overrides.append(f"{task.run_keys[key]}={value}")
    if unused:
        raise ConfigError(
            f"run config {', '.join(f'{k}={run_config[k]!r}' for k in sorted(unused))}: not read by task "
            f"'{task.name}' (it reads {', '.join(sorted(task.run_keys))})"
        )
    return overrides


def launcher_keys_unread(cfg: object) -> None:
    """Under `flwr run` nothing reads the federation keys that a fedhubert command's launcher reads: one set to
    other than its default is an error naming Flower's own setting for it (it would be silently ignored)."""
    federation = getattr(cfg, "federation", None)
    if federation is None:
        return
    default = type(federation)()
    set_keys = [k for k in federation.LAUNCHER_KEYS if getattr(federation, k) != getattr(default, k)]
    if set_keys:
        raise ConfigError(
            "under `flwr run` Flower starts the run, so "
            + "; ".join(f"federation.{k} is not read (use {federation.LAUNCHER_KEYS[k]})" for k in set_keys)
            + ": remove it from the config, or start the run with the stage's fedhubert command"
        )


def _serve_flower_native(task: FederatedTask, grid: Grid, run_config: Mapping[str, object]) -> None:
    """A run started by `flwr run`: the stage's config from the run config, and the stage's records around it."""
    if task.config_cls is None:
        raise FedhubertError(f"task '{task.name}' runs only from its command: fedhubert {task.name} --help")
    root = app_root()
    out = (root / str(run_config.get("out") or f"runs/flwr-{task.name}")).resolve()
    resume = bool(run_config.get("resume", False))
    config = str(run_config.get("config", ""))
    if resume and config:
        raise ConfigError(f"resume=true continues {out} with its own config.yaml: do not pass config={config!r}")
    path = out / CONFIG_FILE if resume else (root / config).resolve() if config else None
    if resume and not path.is_file():
        raise ConfigError(f"resume=true: {path} not found; {out} is not a run folder of task '{task.name}'")
    cfg = absolute_paths(load_config(task.config_cls, path, flat_overrides(task, run_config, root)), root)
    launcher_keys_unread(cfg)
    command = ["flwr", "run", "--run-config", " ".join(f"{k}={v!r}" for k, v in sorted(run_config.items()))]
    with stage_run(
        task.name,
        out,
        cfg,
        force=bool(run_config.get("force", False)),
        owned=task.owned,
        resume=resume,
        command=command,
    ) as record:
        log.info("ServerApp started by flwr run: task %s, output %s (paths relative to %s)", task.name, out, root)
        summary = task.serve(
            grid, ServerRun(out / CONFIG_FILE, out, resume=resume, threads=int(run_config.get("threads", 0)))
        )
        if task.finish is not None:
            task.finish(cfg, out, summary)
        record.summary.update(summary)


def server_app(tasks: Sequence[FederatedTask]) -> ServerApp:
    """One ServerApp for every task, which runs the task the run config names (log: `out/logs/server-<task>.log`
    for a run a fedhubert command started, `out/logs/<task>.log` for one `flwr run` started)."""
    by_name = {task.name: task for task in tasks}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = context.run_config
        name = str(run_config.get("task", ""))
        if name not in by_name:
            raise FedhubertError(f"run config 'task' must be one of {', '.join(by_name)}; got {name!r}")
        if not run_config.get("managed", False):
            setup_logging()
            try:
                if in_simulation(grid):
                    require_restartable(managed=False)
                _serve_flower_native(by_name[name], grid, run_config)
            except FedhubertError as error:  # one clear line in the stream, not only a traceback
                log.error("%s", error)
                raise
            return
        config = Path(str(run_config.get("config", "")))
        out = Path(str(run_config.get("out", "")))
        if not config.is_absolute() or not out.is_absolute():
            raise FedhubertError("run config 'config' and 'out' must be absolute paths (the ServerApp runs elsewhere)")
        out.mkdir(parents=True, exist_ok=True)
        setup_logging(out / "logs" / f"server-{name}.log")
        log.info("ServerApp: task %s, config %s, output %s", name, config, out)
        if in_simulation(grid):
            try:
                require_restartable(managed=True)
            except ActorPoolChanged as error:
                log.error("%s", error)
                raise
        by_name[name].serve(
            grid,
            ServerRun(
                config, out, resume=bool(run_config.get("resume", False)), threads=int(run_config.get("threads", 0))
            ),
        )

    return app


def client_app(tasks: Sequence[FederatedTask]) -> ClientApp:
    """One ClientApp that tells which client a node is (`query.identify`) and answers every task's messages."""
    app = ClientApp()
    app.query("identify")(identify)
    for task in tasks:
        for message_type, handler in task.handlers.items():
            category, _, action = message_type.partition(".")
            register = {"train": app.train, "evaluate": app.evaluate, "query": app.query}[category]
            (register(action) if action else register())(handler)
    return app
