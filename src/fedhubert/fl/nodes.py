"""Waiting for the clients' SuperNodes and learning which client each is: the server says what it waits for, and
for how long, instead of sitting silent (a simulation with fewer SuperNodes than the partition has clients would
otherwise wait until its timeout), and a node config that does not fit the partition is named."""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Message, RecordDict
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


class NodesMisconfigured(FedhubertError):
    """The SuperNodes' partition ids do not cover the partition's clients once each."""


def identify_clients(grid: Grid, needed: int, wait_s: float, timeout_s: float | None) -> dict[int, int]:
    """partition id -> node id of every client, once `needed` nodes are connected (`wait_for_clients`). Each node
    answers `query.identify` with its node config's `partition-id` and `num-partitions`. Two nodes with one
    partition id, or a client no node serves, stop the run; a node whose partition id is beyond the partition's
    clients is named and left idle. `timeout_s`: how long to wait for the answers (None: Flower's default)."""
    nodes = wait_for_clients(grid, needed, wait_s)
    messages = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.identify") for n in nodes
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise NodesMisconfigured(f"node {node} did not identify: {reply.error.reason}")
        said = reply.content["metrics"]
        client = int(said["client"])
        told = f"partition-id={client}" + (
            f", num-partitions={int(said['num_partitions'])}" if "num_partitions" in said else ""
        )
        if client in mapping:
            raise NodesMisconfigured(
                f"nodes {mapping[client]} and {node} both say partition-id={client}: give each SuperNode its own "
                f"partition-id 0..{needed - 1} (fedhubert supernode --partition-id I)"
            )
        if "num_partitions" in said and int(said["num_partitions"]) != needed:
            log.warning(
                "node %d was started with %s, but the partition has %d clients: start SuperNodes with "
                "--num-partitions %d",
                node,
                told,
                needed,
                needed,
            )
        if client >= needed:
            log.warning("node %d (%s) serves no client of this %d-client partition: it stays idle", node, told, needed)
            continue
        mapping[client] = node
    missing = sorted(set(range(needed)) - set(mapping))
    if missing:
        raise NodesMisconfigured(f"no node is client(s) {missing}: check the SuperNodes' partition-id")
    return mapping
