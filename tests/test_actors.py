"""The restartable client actors of fedhubert's simulations lean on Flower's and Ray's actor-pool internals: the
installed code must be the code they were written for, and a fedhubert simulation must have them in force."""

from __future__ import annotations

import subprocess
import sys

from fedhubert.fl.runtime.actors import WRAPPED_SOURCES, changed_sources

CHECKS = """
import logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
from fedhubert.fl.runtime import actors

try:
    actors.require_restartable(managed=True)
except actors.ActorPoolChanged as error:
    print("managed, not in force:", error)
actors.require_restartable(managed=False)
saved = dict(actors.WRAPPED_SOURCES)
actors.WRAPPED_SOURCES["ray.util.actor_pool.ActorPool"] = "0" * 64
try:
    actors.restartable_actors()
except actors.ActorPoolChanged as error:
    print("changed:", error)
print("in force after refusal:", actors.restartable_in_force())
actors.WRAPPED_SOURCES.update(saved)
actors.restartable_actors()
actors.require_restartable(managed=True)
print("in force:", actors.restartable_in_force())
"""


def test_the_wrapped_flower_and_ray_code_is_the_pinned_one():
    """Fails when a Flower or Ray upgrade changes BasicActorPool or ActorPool: check the wrappers against the new
    code, then update WRAPPED_SOURCES."""
    assert changed_sources() == [], WRAPPED_SOURCES


def test_the_start_up_check_refuses_a_simulation_without_restartable_actors():
    out = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "managed, not in force: this simulation was not started through fedhubert's flwr-simulation launcher" in out
    assert "another `flwr-simulation` came first on the SuperLink's PATH" in out
    # a user's own `flwr run`: warned, not refused
    assert "a fedhubert command (e.g. fedhubert pretrain) starts its simulation with restartable actors" in out
    assert "changed: flwr 1.41.0 / ray 2.55.1: ray.util.actor_pool.ActorPool differ" in out
    assert "in force after refusal: False" in out and out.rstrip().endswith("in force: True")
