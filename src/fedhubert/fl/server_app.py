"""fedhubert's Flower ServerApp: one app for every federated task, chosen by the run config's `task`.

Run config keys: `task` (kmeans), `config` (the stage's resolved YAML config), `out` (the stage's output folder).
`fedhubert <stage>` fills them in; `flwr run` users pass them with --run-config.
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

TASKS = ("kmeans",)


@app.main()
def main(grid: Grid, context: Context) -> None:
    task = str(context.run_config.get("task", ""))
    if task not in TASKS:
        raise FedhubertError(f"run config 'task' must be one of {', '.join(TASKS)}; got {task!r}")
    config = Path(str(context.run_config["config"]))
    out = Path(str(context.run_config["out"]))
    setup_logging(out / "logs" / f"server-{task}.log")
    log.info("ServerApp: task %s, config %s, output %s", task, config, out)
    from fedhubert.fl.kmeans_app import serve_kmeans

    serve_kmeans(grid, config, out)
