"""Misbehaving clients, in real Flower simulations: fedhubert's own ClientApp wrapped by tests/reliability/
hostile_app, run through `federation.app`. A client that raises, returns NaN, a wrong shape or a missing parameter,
or whose process dies mid-round, is left out with a logged reason and the round completes from the others; below
`strategy.min_clients` the run stops with a usable checkpoint of the last good round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common import DISTILL_FAST, KMEANS_FAST, PRETRAIN_FAST, rows, run_cli
from fedhubert.fl.records import read_messages
from fedhubert.model.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
HOSTILE_APP = Path(__file__).resolve().parent / "hostile_app"


@pytest.fixture
def plan(tmp_path, monkeypatch):
    def write(behaviours: dict[int, dict[int, str]]) -> None:
        path = tmp_path / "drill-plan.json"
        path.write_text(
            json.dumps({str(c): {str(r): b for r, b in by_round.items()} for c, by_round in behaviours.items()})
        )
        monkeypatch.setenv("FEDHUBERT_DRILL_PLAN", str(path))

    return write


def finite(checkpoint: Path) -> bool:
    state = load_checkpoint(checkpoint)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_bad_updates_are_rejected_with_reasons_and_rounds_complete(
    small_partition, small_kmeans, tmp_path, plan, intact
):
    """Each bad reply is left out with its reason and the rounds complete from the others. Client 1's process dies in
    round 2 (its Ray actor with it): Flower 1.41 would keep the dead actor and fail every later message given to it,
    so fedhubert's simulation makes actors restartable (`fedhubert.fl.runtime.actors`), and round 3 trains client 1
    again."""
    intact(small_partition, small_kmeans)
    plan({0: {1: "raise", 3: "missing"}, 1: {1: "nan", 2: "exit"}, 2: {2: "shape"}})
    out = tmp_path / "hostile"
    assert (
        run_cli(
            "pretrain",
            "--partition",
            small_partition,
            "--kmeans",
            small_kmeans,
            "--out",
            out,
            *PRETRAIN_FAST,
            "--rounds",
            "3",
            "strategy.min_clients=1",
            f"federation.app={HOSTILE_APP}",
        )
        == 0
    )
    reasons = {(f["round"], f["client"]): f["reason"] for f in rows(out, "failure")}
    assert set(reasons) == {(1, 0), (1, 1), (2, 1), (2, 2), (3, 0)}, reasons
    assert "client error" in reasons[1, 0] and "drill: this client raises" in reasons[1, 0]
    assert "NaN or infinite" in reasons[1, 1]
    assert "actor" in reasons[2, 1]
    assert "has shape" in reasons[2, 2]
    assert "wrong parameters" in reasons[3, 0]
    assert [r["clients"] for r in rows(out, "train")] == [1, 1, 2]
    assert finite(out / "checkpoints" / "final.pt")
    log = (out / "logs" / "pretrain.log").read_text() + (out / "logs" / "server-pretrain.log").read_text()
    assert "round 1: client 1 left out: rejected update: " in log


def test_too_few_good_updates_stop_with_the_last_good_round_checkpointed(
    small_partition, small_kmeans, tmp_path, plan, capsys
):
    plan({2: {2: "nan"}})
    out = tmp_path / "under-minimum"
    assert (
        run_cli(
            "pretrain",
            "--partition",
            small_partition,
            "--kmeans",
            small_kmeans,
            "--out",
            out,
            *PRETRAIN_FAST,
            "--rounds",
            "3",
            "strategy.min_clients=3",
            f"federation.app={HOSTILE_APP}",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "round 2: 2 of 3 clients replied usable updates, fewer than strategy.min_clients=3" in err
    assert "NaN or infinite" in err and "--resume" in err
    checkpoint = out / "checkpoints" / "round_00001.pt"
    assert load_checkpoint(checkpoint)["state"]["round"] == 1 and finite(checkpoint)
    assert not (out / "checkpoints" / "round_00002.pt").exists()


def test_distillation_rejects_a_nan_student_update(tiny_teacher, small_partition, tmp_path, plan):
    plan({0: {1: "nan"}})
    out = tmp_path / "distill-hostile"
    assert (
        run_cli(
            "distill",
            "--teacher",
            tiny_teacher,
            "--partition",
            small_partition,
            "--out",
            out,
            "--rounds",
            "1",
            *DISTILL_FAST,
            f"federation.app={HOSTILE_APP}",
        )
        == 0
    )
    [failure] = rows(out, "failure")
    assert failure["client"] == 0 and "NaN or infinite" in failure["reason"]
    assert finite(out / "checkpoints" / "final.pt")


def test_a_run_stopped_in_round_one_resumes(small_partition, small_kmeans, tmp_path, plan, monkeypatch, capsys):
    """Round 1 fails below the minimum: the stage stops with an error that says so and how to go on, round_00000.pt
    holds the initial model and a server optimizer without moments yet; --resume, with the client fixed, continues
    from it."""
    plan({2: {1: "nan"}})
    out = tmp_path / "stopped-in-round-one"
    assert (
        run_cli(
            "pretrain",
            "--partition",
            small_partition,
            "--kmeans",
            small_kmeans,
            "--out",
            out,
            *PRETRAIN_FAST,
            "--rounds",
            "2",
            "strategy.name=fedadam",
            "strategy.min_clients=3",
            f"federation.app={HOSTILE_APP}",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "fewer than strategy.min_clients=3" in err and "--resume" in err
    assert load_checkpoint(out / "checkpoints" / "round_00000.pt")["state"]["round"] == 0
    monkeypatch.delenv("FEDHUBERT_DRILL_PLAN")
    assert run_cli("pretrain", "--resume", out) == 0
    final = load_checkpoint(out / "checkpoints" / "final.pt")
    assert (
        final["state"]["round"] == 2
        and "m_t" in final["state"]["strategy"]
        and finite(out / "checkpoints" / "final.pt")
    )


def test_kmeans_leaves_out_a_client_that_sends_garbage_or_hangs_and_training_never_samples_it(
    small_partition, kmeans_features, tmp_path, plan, monkeypatch
):
    """Client 1 sends NaN statistics in Lloyd round 1 and client 2 hangs while labelling: each is left out of the
    rest of the stage with its reason (the hang after lloyd.timeout_s, not forever), the stage ends with client 0's
    labels, and pretraining on them never samples the other two."""
    plan({1: {"stats:1": "garbage"}, 2: {"labels": "stall"}})
    monkeypatch.setenv("FEDHUBERT_DRILL_STALL_S", "45")
    out = tmp_path / "kmeans-hostile"
    assert (
        run_cli(
            "kmeans",
            "--partition",
            small_partition,
            "--out",
            out,
            *KMEANS_FAST,
            f"feature_dir={kmeans_features}",
            "lloyd.timeout_s=30",  # round 1 also starts the actors: 15 s ran out beside a second pytest-xdist worker
            f"federation.app={HOSTILE_APP}",
        )
        == 0
    )
    record = json.loads((out / "kmeans.json").read_text())
    failed = {f["client"]: f for f in record["failed_clients"]}
    assert set(failed) == {1, 2}, failed
    assert failed[1]["stage"] == "kmeans_stats" and failed[1]["round"] == 1 and "not finite" in failed[1]["reason"]
    assert failed[2]["stage"] == "kmeans_labels" and failed[2]["reason"] == "no reply within 30 s"
    assert [c["client"] for c in record["clients"]] == [0]
    assert [h["clients"] for h in record["history"]] == [2] * len(record["history"])
    assert (out / "client_0" / "train.km").is_file()  # (a hung client may still write its own later, unrecorded)
    monkeypatch.delenv("FEDHUBERT_DRILL_PLAN")
    pretrain = tmp_path / "pretrain-on-one"
    assert (
        run_cli(
            "pretrain",
            "--partition",
            small_partition,
            "--kmeans",
            out,
            "--out",
            pretrain,
            *PRETRAIN_FAST,
            "--rounds",
            "2",
            "strategy.min_clients=1",
        )
        == 0
    )
    messages = read_messages(pretrain / "messages.jsonl")
    assert {m["client"] for m in messages if m["direction"] == "to_client" and m["type"] == "train"} == {0}
    log = (pretrain / "logs" / "server-pretrain.log").read_text()
    assert "2 of 3 clients are never sampled: client 1: no k-means labels (it failed in kmeans_stats" in log
