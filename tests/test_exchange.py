"""The server's exchanges against Flower's own in-memory SuperLink state (the link state and Grid a simulation's
ServerApp uses), with this test as the SuperNode: instructions go out in a window, a reply is taken as it comes,
an exchange that times out gives its instructions' ids to the stragglers, and the stragglers are pulled until the
SuperLink has let them go (a late reply dropped, an expired instruction deleted), so nothing stays stored."""

from __future__ import annotations

import secrets
import threading
import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedhubert.fl.exchange import Stragglers, exchange, message_ttl, send_window, stored_messages


@pytest.fixture
def link(task_identity):
    """Flower's in-memory link state with one run and two nodes, and the Grid on it (as flwr-simulation sets up);
    messages are made as the simulation's ServerApp makes them (from the SuperLink's node)."""
    from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.node_id = SUPERLINK_NODE_ID

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=1)
    run.federation_id, run.primary_task_id = NOOP_FEDERATION_ID, 1
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=run.run_id)
    nodes = []
    for _ in range(2):
        node = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32), HEARTBEAT_INTERVAL_INF)
        state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        nodes.append(node)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return grid, state, nodes


def instruction(node: int, client: int, ttl: float | None) -> Message:
    return Message(
        RecordDict({"round": ConfigRecord({"client": client})}), dst_node_id=node, message_type="train", ttl=ttl
    )


def reply_to(state, message: Message) -> None:
    reply = Message(RecordDict({"round": ConfigRecord(dict(message.content["round"]))}), reply_to=message)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    state.store_message_res(reply)


def answer(state, node: int, held: list[Message] | None = None, hold: frozenset[int] = frozenset()) -> None:
    """Act as the node: take its undelivered instructions and reply to each, except those of the clients in
    `hold`, which go to `held` (a slow client, to reply later)."""
    for message in state.get_message_ins(node_id=node, limit=None):
        if int(message.content["round"]["client"]) in hold:
            held.append(message)
        else:
            reply_to(state, message)


def test_a_timed_out_instruction_and_its_late_reply_are_let_go(link):
    grid, state, nodes = link
    stragglers = Stragglers()
    outgoing = [(c, instruction(nodes[c % 2], c, message_ttl(3.0))) for c in range(3)]
    taken: list[int] = []
    held: list[Message] = []
    stop = threading.Event()

    def node_loop() -> None:  # client 2 does not answer in time
        while not stop.is_set():
            for node in nodes:
                answer(state, node, held, hold=frozenset({2}))
            time.sleep(0.01)

    thread = threading.Thread(target=node_loop)
    thread.start()
    try:
        done = exchange(
            grid,
            outgoing,
            lambda c, r: taken.append(c),
            timeout_s=3.0,
            label="round 1",
            window=2,
            stragglers=stragglers,
        )
    finally:
        stop.set()
        thread.join()
    assert sorted(taken) == [0, 1] and done.missing == [2] and len(done.unanswered) == 1
    assert list(stragglers.ids) == done.unanswered
    assert state.num_message_ins() == 1 and state.num_message_res() == 0  # the straggler's instruction is stored
    assert stored_messages(grid)["link_instructions"] == 1 and stored_messages(grid)["link_replies"] == 0
    # Its reply comes late; the next exchange (here with nothing to send) pulls it first and drops it.
    [late] = held
    reply_to(state, late)
    assert state.num_message_res() == 1
    exchange(grid, [], lambda c, r: None, timeout_s=1.0, label="round 2", stragglers=stragglers)
    assert stragglers.ids == {} and stragglers.late_replies == 1
    assert stored_messages(grid) == {"link_instructions": 0, "link_replies": 0, "link_objects": 0}


def test_an_instruction_never_answered_is_deleted_once_its_ttl_has_passed(link):
    grid, state, nodes = link
    stragglers = Stragglers()
    done = exchange(
        grid, [(0, instruction(nodes[0], 0, 3.0))], lambda c, r: None, timeout_s=0.1, label="r1", stragglers=stragglers
    )
    assert done.missing == [0] and state.num_message_ins() == 1
    stragglers.collect(grid)  # before the TTL: still stored, still a straggler
    assert len(stragglers.ids) == 1 and state.num_message_ins() == 1
    time.sleep(3.1)
    stragglers.collect(grid)  # after it: Flower answers with an expiry error and deletes the instruction
    assert stragglers.ids == {} and stragglers.late_replies == 0 and state.num_message_ins() == 0


def test_the_window_bounds_the_instructions_in_flight(link):
    grid, state, nodes = link
    most = 0
    outgoing = [(c, instruction(nodes[c % 2], c, None)) for c in range(10)]

    stop = threading.Event()

    def node_loop() -> None:
        nonlocal most
        while not stop.is_set():
            most = max(most, state.num_message_ins())  # instructions stored: sent and not yet let go
            for node in nodes:
                answer(state, node)
            time.sleep(0.005)

    thread = threading.Thread(target=node_loop)
    thread.start()
    try:
        done = exchange(grid, outgoing, lambda c, r: None, timeout_s=30.0, label="windowed", window=3)
    finally:
        stop.set()
        thread.join()
    assert done.missing == [] and 1 <= most <= 3
    assert send_window(1) == 16 and send_window(10) == 40
