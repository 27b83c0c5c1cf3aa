"""Which SuperNode serves which client.

Two ways (`federation.virtual_clients`):
- Virtual clients (simulation, or a cluster with shared storage): a pool of SuperNodes serves every client of the
  partition; each message names its client. A round's clients go to the nodes longest first, each to the node
  with the least audio so far (greedy LPT scheduling, as pfl-research schedules users onto workers), and are
  dispatched in that order, so that no node, and in simulation no worker, straggles with the longest clients at the
  end. The pool is read again every round: a node that joins serves the next round, one that left is not used.
- One SuperNode per client (a real federation): each node is the client of its node config's `partition-id`,
  learned once by asking every node (`identify_clients`). A client whose node has not connected (or identified)
  within `federation.connect_timeout_s` is named once and never sampled: the run starts without it, as long as at
  least the stage's minimum of clients are there.
The server says what it waits for, and for how long, instead of sitting silent, and a node config that does not
fit the partition is named."""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from fedhubert.errors import FedhubertError
from fedhubert.fl.exchange import client_error

log = logging.getLogger(__name__)


def in_simulation(grid: Grid) -> bool:
    """Whether the ServerApp runs in Flower's simulation engine (whose ServerApp gets an in-memory Grid; a
    deployment's gets one that talks to the SuperLink)."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


class ClientsMissing(FedhubertError):
    """Fewer clients connected than the run needs, within the configured wait."""


def waiting_message(needed: int, connected: int) -> str:
    return (
        f"waiting for {needed} clients, {connected} connected: without virtual clients a simulation needs one "
        f'SuperNode per client of the partition (flwr run ... --federation-config "num-supernodes={needed}"); a '
        f"deployment needs a SuperNode for each partition-id 0..{needed - 1}; with federation.virtual_clients=true "
        "any number of SuperNodes serves every client"
    )


def wait_for_clients(
    grid: Grid,
    needed: int,
    wait_s: float,
    *,
    every_s: float = 10.0,
    what: str | None = None,
    least: int | None = None,
) -> list[int]:
    """The connected node ids, once at least `needed` are connected (`what`: of a pool of virtual clients' nodes;
    None: the clients' own). Says within 2 s, and then every `every_s`, how many are; after `wait_s`
    (federation.connect_timeout_s) returns those connected if they are at least `least`, else gives up with that
    message."""
    start = time.monotonic()
    said = None

    def waiting(connected: int) -> str:
        if what is None:
            return waiting_message(needed, connected)
        return f"waiting for {needed} {what}, {connected} connected (federation.supernodes)"

    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed:
            if said is not None:
                log.info("all %d %s connected after %.0f s", needed, what or "clients", time.monotonic() - start)
            return nodes
        waited = time.monotonic() - start
        if waited > wait_s and least is not None and len(nodes) >= least:
            log.warning(
                "%s after %.0f s (federation.connect_timeout_s): starting with those", waiting(len(nodes)), waited
            )
            return nodes
        if waited > wait_s:
            raise ClientsMissing(f"gave up after {wait_s:.0f} s (federation.connect_timeout_s): {waiting(len(nodes))}")
        if (said is None and waited >= 2.0) or (said is not None and waited - said >= every_s):
            then = "giving up" if least is None else f"then starting with those connected (if at least {least})"
            log.warning("%s; %s in %.0f s", waiting(len(nodes)), then, wait_s - waited)
            said = waited
        time.sleep(0.5)


class NodesMisconfigured(FedhubertError):
    """The SuperNodes' partition ids do not cover the partition's clients once each."""


def identify_clients(
    grid: Grid, needed: int, wait_s: float, timeout_s: float | None, least: int | None = None
) -> dict[int, int]:
    """partition id -> node id of the clients, once `needed` nodes are connected or, after `wait_s`, at least `least`
    (`wait_for_clients`; None: all). Each node answers `query.identify` with its node config's `partition-id` and
    `num-partitions`. Two nodes with one partition id stop the run; clients no node serves are named once and left
    out, unless fewer than `least` are left (None: any is missing); a node whose partition id is beyond the
    partition's clients is named and left idle. `timeout_s`: how long to wait for the answers (None: Flower's
    default)."""
    nodes = wait_for_clients(grid, needed, wait_s, least=least)
    messages = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.identify") for n in nodes
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise NodesMisconfigured(f"node {node} did not identify: {client_error(reply)}")
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
    if missing and (least is None or len(mapping) < least):
        raise NodesMisconfigured(f"no node is client(s) {missing}: check the SuperNodes' partition-id")
    if missing:
        log.warning(
            "no SuperNode serves %d of the %d clients (%s): they are never sampled; start a SuperNode with "
            "--partition-id I for each to include them",
            len(missing),
            needed,
            _ids(missing),
        )
    return mapping


def _ids(clients: Sequence[int], most: int = 20) -> str:
    shown = ", ".join(map(str, clients[:most]))
    return f"client(s) {shown}" + (f" and {len(clients) - most} more" if len(clients) > most else "")


@dataclass
class ClientNodes:
    """The nodes that serve a run's clients: a pool that serves any client (`virtual`), or one node per client
    (`mapping`: partition id -> node id)."""

    grid: Grid
    virtual: bool
    mapping: dict[int, int]
    num_clients: int = 0

    def missing(self) -> list[int]:
        """The clients no node serves (one node per client); none with virtual clients."""
        return [] if self.virtual else [c for c in range(self.num_clients) if c not in self.mapping]

    def pool(self) -> list[int]:
        """The nodes connected now (virtual clients)."""
        return sorted(self.grid.get_node_ids())

    def describe(self, num_clients: int) -> str:
        if self.virtual:
            return f"{num_clients} clients served by a pool of {len(self.pool())} SuperNode(s)"
        return f"{len(self.mapping)} of {num_clients} clients, one SuperNode each"

    def assign(self, clients: Sequence[int], seconds: Mapping[int, float] | Sequence[float]) -> list[tuple[int, int]]:
        """(client, node) for each of `clients`, in the order to dispatch them. Virtual: longest first (by
        `seconds`, the client's audio), each to the pool's node with the least audio so far; else each client's own
        node, in client order."""
        if not self.virtual:
            return [(client, self.mapping[client]) for client in sorted(clients)]
        nodes = self.pool()
        if not nodes:
            raise ClientsMissing("no SuperNode is connected to serve the round's clients")
        load = [(0.0, rank, node) for rank, node in enumerate(nodes)]
        plan = []
        for client in sorted(clients, key=lambda c: (-float(seconds[c]), c)):
            total, rank, node = heapq.heappop(load)
            plan.append((client, node))
            heapq.heappush(load, (total + float(seconds[client]), rank, node))
        return plan


def connect_clients(
    grid: Grid,
    num_clients: int,
    virtual: bool,
    wait_s: float,
    timeout_s: float | None,
    *,
    pool: int | None = None,
    settle_s: float = 1.0,
    least: int | None = None,
) -> ClientNodes:
    """The run's ClientNodes. Virtual: once `pool` nodes (at most one per client) are connected
    (`federation.supernodes`), or without it
    once at least one is and no other has joined for `settle_s` (a simulation registers its whole pool at once);
    else every client's node, or after `wait_s` those of at least `least` clients (`identify_clients`)."""
    if not virtual:
        mapping = identify_clients(grid, num_clients, wait_s, timeout_s, least)
        found = ClientNodes(grid, False, mapping, num_clients)
        log.info("%s", found.describe(num_clients))
        return found
    nodes = wait_for_clients(grid, min(pool or 1, num_clients), wait_s, what="SuperNodes of the pool")
    while pool is None:
        time.sleep(settle_s)
        now = sorted(grid.get_node_ids())
        if len(now) == len(nodes):
            break
        nodes = now
    found = ClientNodes(grid, True, {})
    log.info("%s", found.describe(num_clients))
    return found


def served_client(message: Message, context: Context, record: str) -> tuple[int, bool]:
    """Which client a message is for, and whether it named it: the client its `record` names (virtual clients:
    any node serves any client), else the node's own `partition-id`."""
    info = message.content[record]
    if "client" in info:
        return int(info["client"]), True
    return int(context.node_config["partition-id"]), False
