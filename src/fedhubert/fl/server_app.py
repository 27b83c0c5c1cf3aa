"""fedhubert's Flower ServerApp: one app for every federated task, chosen by the run config's `task`.

Run config keys: `task` (kmeans, pretrain, distill), `config` (the stage's YAML config), `out` (the output folder), both
absolute paths, `resume` (continue from the newest checkpoint in `out`) and, for training tasks, `threads` (CPU
threads per client). `fedhubert <stage>` fills them in; `flwr run` users pass them with --run-config.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhubert.errors import FedhubertError
from fedhubert.runlog import setup_logging

log = logging.getLogger("fedhubert")
app = ServerApp()

TASKS = ("kmeans", "pretrain", "distill")


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    task = str(run_config.get("task", ""))
    if task not in TASKS:
        raise FedhubertError(f"run config 'task' must be one of {', '.join(TASKS)}; got {task!r}")
    config = Path(str(run_config.get("config", "")))
    out = Path(str(run_config.get("out", "")))
    if not config.is_absolute() or not out.is_absolute():
        raise FedhubertError("run config 'config' and 'out' must be absolute paths (the ServerApp runs elsewhere)")
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out / "logs" / f"server-{task}.log")
    log.info("ServerApp: task %s, config %s, output %s", task, config, out)
    if task == "kmeans":
        from fedhubert.fl.kmeans_app import serve_kmeans

        serve_kmeans(grid, config, out, resume=bool(run_config.get("resume", False)))
    else:
        if task == "pretrain":
            from fedhubert.pretrain.server import serve_pretrain as serve
        else:
            from fedhubert.distill.server import serve_distill as serve
        serve(grid, config, out, resume=bool(run_config.get("resume", False)), threads=int(run_config.get("threads", 0)))
