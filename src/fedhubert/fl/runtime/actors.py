"""Restartable client actors for Flower's simulation engine.

Flower 1.41's simulation keeps a Ray actor whose process died in its pool, and every later message handed to it
fails at once ("The actor died unexpectedly before finishing this task"). Those failures are instant, so the dead
actor takes most of the queue: with 160 clients and 2 actors, one client whose process exited during federated
k-means took 129 others with it (`benchmarks/drills_scale.py --quick`, before this module). fedhubert's simulation
SuperLink therefore starts `flwr-simulation` through `simulation_main`, which creates the pool's actors with Ray's
`max_restarts=-1`: Ray starts a dead actor's process again, and the one message it was running fails (its client
is left out, as before). A message handed to the actor while it restarts never reaches it (Ray's
ActorUnavailableError, "The actor is restarting"): the pool sends it again once the actor is back, so it is not
counted against its client (the drill at 1,600 clients lost 3 such clients before this retry, and which ones
depended on timing, so a resumed run differed).
"""

from __future__ import annotations

import hashlib
import inspect
import stat
import sys
import time
from pathlib import Path

from fedhubert.errors import FedhubertError

LAUNCHER = "flwr-simulation"
RESTART_WAIT_S = 300.0  # how long a message waits for its actor to come back
# The code the wrappers below lean on (its private `_future_to_actor` and `create_actor_fn` included), as flwr
# 1.41.0 and ray 2.55.1 have it: sha256 of the source of Flower's BasicActorPool and of Ray's ActorPool under it.
WRAPPED_SOURCES = {
    "flwr.simulation.ray_transport.ray_actor.BasicActorPool": (
        "68dd4f31bc6e465591269720a430bc132f0fbe1ee10b9629ccec6722b1c9c971"
    ),
    "ray.util.actor_pool.ActorPool": "49c7d1caef989c4fed8444ea9ec091586becdc472ce596263c2255d01afe3481",
}


class ActorPoolChanged(FedhubertError):
    """The Flower or Ray code that restartable actors wrap is not the code they were written for."""


def changed_sources() -> list[str]:
    """The wrapped classes whose installed source differs from WRAPPED_SOURCES."""
    import importlib

    changed = []
    for name, digest in WRAPPED_SOURCES.items():
        module, _, cls = name.rpartition(".")
        source = inspect.getsource(getattr(importlib.import_module(module), cls))
        if hashlib.sha256(source.encode()).hexdigest() != digest:
            changed.append(name)
    return changed


def restartable_in_force() -> bool:
    """Whether this process's Flower actor pool makes restartable actors (`restartable_actors` ran here)."""
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    return bool(getattr(BasicActorPool, "_fedhubert_restartable", False))


def require_restartable(managed: bool) -> None:
    """The start-up check of a simulation's ServerApp. A simulation that a fedhubert command started must have
    restartable actors (its `flwr-simulation` is this module's launcher, first on the SuperLink's PATH); one that a
    user's own `flwr run` started (Flower's own `flwr-simulation`) is told what it lacks, once."""
    import logging

    if restartable_in_force():
        return
    lacks = (
        "client actors are not restartable: a client whose process dies would fail every later message handed to "
        "its actor (fedhubert.fl.runtime.actors)"
    )
    if managed:
        raise ActorPoolChanged(
            f"this simulation was not started through fedhubert's flwr-simulation launcher, so {lacks}; another "
            "`flwr-simulation` came first on the SuperLink's PATH: start the simulation with a fedhubert command"
        )
    logging.getLogger(__name__).warning(
        "%s; a fedhubert command (e.g. fedhubert pretrain) starts its simulation with restartable actors", lacks
    )


def restartable_actors() -> None:
    """Make Flower's actor pool create restartable actors (idempotent); refuses a Flower or Ray whose wrapped code
    changed, since the wrappers lean on its internals."""
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    if getattr(BasicActorPool, "_fedhubert_restartable", False):
        return
    changed = changed_sources()
    if changed:
        import flwr
        import ray

        raise ActorPoolChanged(
            f"flwr {flwr.__version__} / ray {ray.__version__}: {', '.join(changed)} differ from the code "
            "fedhubert.fl.runtime.actors wraps to make simulation client actors restartable (flwr 1.41.0, ray "
            "2.55.1, the pinned versions: requirements/lock.txt); install those, or check the wrappers against the "
            "new code and update WRAPPED_SOURCES"
        )
    original = BasicActorPool.__init__

    def __init__(self, actor_type, client_resources, actor_kwargs):
        original(self, actor_type, client_resources, actor_kwargs)
        self._fedhubert_jobs = {}  # future -> (actor_fn, job), to send a job again (set up before any thread runs)
        kwargs = {} if actor_kwargs is None else actor_kwargs
        options = {**client_resources, "max_restarts": -1, "max_task_retries": 0}
        self.create_actor_fn = lambda: actor_type.options(**options).remote(**kwargs)

    submit, fetch = BasicActorPool.submit, BasicActorPool.fetch_result_and_return_actor_to_pool

    def remembering_submit(self, actor_fn, job):
        future = submit(self, actor_fn, job)
        self._fedhubert_jobs[future] = (actor_fn, job)
        return future

    def fetch_or_resend(self, future):
        import ray

        actor_fn, job = self._fedhubert_jobs.pop(future)
        original, deadline = future, time.monotonic() + RESTART_WAIT_S
        while True:
            try:
                return fetch(self, future)
            except ray.exceptions.ActorUnavailableError as error:
                actor = self._future_to_actor.pop(future)
                if "restarting" not in str(error) or time.monotonic() > deadline:
                    self._future_to_actor[original] = actor  # where Flower's error path returns it to the pool
                    raise
                time.sleep(0.5)
                future = actor_fn(actor, *job)
                self._future_to_actor[future] = actor

    BasicActorPool.__init__ = __init__
    BasicActorPool.submit = remembering_submit
    BasicActorPool.fetch_result_and_return_actor_to_pool = fetch_or_resend
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
