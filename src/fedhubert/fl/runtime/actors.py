"""Restartable client actors for Flower's simulation engine.

Flower 1.41's simulation keeps a Ray actor whose process died in its pool, and every later message handed to it
fails at once ("The actor died unexpectedly before finishing this task"). Those failures are instant, so the dead
actor takes most of the queue: with 160 clients and 2 actors, one client whose process exited during federated
k-means took 129 others with it (`benchmarks/drills_scale.py --quick`, before this module). fedhubert's simulation
SuperLink therefore starts `flwr-simulation` through `simulation_main`, which creates the pool's actors with Ray's
`max_restarts=-1`: Ray starts a dead actor's process again, the one message it was running fails (its client is
left out, as before), and the messages after it wait for the restarted actor instead of failing.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

LAUNCHER = "flwr-simulation"


def restartable_actors() -> None:
    """Make Flower's actor pool create restartable actors (idempotent)."""
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    if getattr(BasicActorPool, "_fedhubert_restartable", False):
        return
    original = BasicActorPool.__init__

    def __init__(self, actor_type, client_resources, actor_kwargs):
        original(self, actor_type, client_resources, actor_kwargs)
        kwargs = {} if actor_kwargs is None else actor_kwargs
        options = {**client_resources, "max_restarts": -1, "max_task_retries": 0}
        self.create_actor_fn = lambda: actor_type.options(**options).remote(**kwargs)

    BasicActorPool.__init__ = __init__
    BasicActorPool._fedhubert_restartable = True


def simulation_main() -> int:
    """Flower's `flwr-simulation`, with restartable actors."""
    restartable_actors()
    from flwr.simulation.app import flwr_simulation

    sys.argv[0] = LAUNCHER  # Flower's exit handling recognises the simulation by it
    return flwr_simulation()


def write_launcher(folder: Path) -> Path:
    """An executable `flwr-simulation` in `folder` that runs `simulation_main` with this interpreter. Put first on
    a simulation SuperLink's PATH, it is what the SuperExec starts for each run."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LAUNCHER
    path.write_text(
        f"#!{sys.executable}\nimport sys\n\nfrom fedhubert.fl.runtime.actors import simulation_main\n\n"
        "sys.exit(simulation_main())\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path
