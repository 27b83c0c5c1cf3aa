"""Waiting for the clients' SuperNodes: the server says what it waits for, and for how long, instead of sitting
silent (a simulation with fewer SuperNodes than the partition has clients would otherwise wait until its timeout)."""

from __future__ import annotations

import logging
import time

from flwr.serverapp import Grid

from fedhubert.errors import FedhubertError

log = logging.getLogger(__name__)


class ClientsMissing(FedhubertError):
    """Fewer clients connected than the run needs, within the configured wait."""


def waiting_message(needed: int, connected: int) -> str:
    return (
        f"waiting for {needed} clients, {connected} connected: a simulation needs one SuperNode per client of the "
        f'partition (flwr run ... --federation-config "num-supernodes={needed}"); a deployment needs a SuperNode for '
        f"each partition-id 0..{needed - 1}"
    )


def wait_for_clients(grid: Grid, needed: int, wait_s: float, *, every_s: float = 10.0) -> list[int]:
    """The connected node ids, once at least `needed` are connected. Says within 2 s, and then every `every_s`,
    how many are; after `wait_s` (federation.connect_timeout_s) gives up with that message."""
    start = time.monotonic()
    said = None
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed:
            if said is not None:
                log.info("all %d clients connected after %.0f s", needed, time.monotonic() - start)
            return nodes
        waited = time.monotonic() - start
        if waited > wait_s:
            raise ClientsMissing(
                f"gave up after {wait_s:.0f} s (federation.connect_timeout_s): {waiting_message(needed, len(nodes))}"
            )
        if (said is None and waited >= 2.0) or (said is not None and waited - said >= every_s):
            log.warning("%s; giving up in %.0f s", waiting_message(needed, len(nodes)), wait_s - waited)
            said = waited
        time.sleep(0.5)
