"""The federated tasks of fedhubert's Flower app, and the ServerApp and ClientApp that run them.

A stage declares its task: the ServerApp's main for it and the ClientApp's handlers of the messages that main
sends. `fedhubert.app` lists the stages' tasks and builds the two apps here, so fl/ knows no stage.

Run config keys: `task` (a task's name), `config` (the stage's YAML config) and `out` (the output folder), both
absolute paths, `resume` (continue from the newest checkpoint in `out`) and, for training tasks, `threads` (CPU
threads per client). `fedhubert <stage>` fills them in; `flwr run` users pass them with --run-config.

A client is identified by its node's `partition-id` (never by anything process-specific) and reads its own
folder `client_<partition-id>` of the partition. Optional node config keys for deployments: `partition-dir`
(where this node keeps the partition) and `work-dir` (where it writes features and labels).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedhubert.errors import FedhubertError
from fedhubert.fl.local import identify
from fedhubert.runlog import setup_logging

log = logging.getLogger("fedhubert")


@dataclass(frozen=True)
class ServerRun:
    """What the run config asks of a task's ServerApp main."""

    config: Path
    out: Path
    resume: bool
    threads: int  # 0: PyTorch's default


@dataclass(frozen=True)
class FederatedTask:
    name: str  # the run config's `task`
    serve: Callable[[Grid, ServerRun], object]
    handlers: Mapping[str, Callable[[Message, Context], Message]]  # by message type, e.g. "train.distill"


def server_app(tasks: Sequence[FederatedTask]) -> ServerApp:
    """One ServerApp for every task, which runs the task the run config names (log: `out/logs/server-<task>.log`)."""
    by_name = {task.name: task for task in tasks}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = context.run_config
        name = str(run_config.get("task", ""))
        if name not in by_name:
            raise FedhubertError(f"run config 'task' must be one of {', '.join(by_name)}; got {name!r}")
        config = Path(str(run_config.get("config", "")))
        out = Path(str(run_config.get("out", "")))
        if not config.is_absolute() or not out.is_absolute():
            raise FedhubertError("run config 'config' and 'out' must be absolute paths (the ServerApp runs elsewhere)")
        out.mkdir(parents=True, exist_ok=True)
        setup_logging(out / "logs" / f"server-{name}.log")
        log.info("ServerApp: task %s, config %s, output %s", name, config, out)
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
