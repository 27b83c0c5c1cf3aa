"""A client round run in this process, as a Flower client actor runs it: the model built once and reused by the
next client it serves gives exactly the reply a freshly built one gives, a client without a head of its own starts
from the initial head, the validation pass is bounded, and a message that names its client is served as that
client whatever the node's partition-id."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from common import SMALL_K
from fedhubert.config import load_config
from fedhubert.fl import local
from fedhubert.fl.records import config_to_record
from fedhubert.fl.weights import decode, encode
from fedhubert.model.hubert import LABEL_HEAD_KEYS, build_hubert
from fedhubert.pretrain.client import train_round
from fedhubert.pretrain.config import PretrainConfig
from fedhubert.train.data import LabelRate, load_utterances

pytestmark = pytest.mark.usefixtures("task_identity")


def settings(partition: Path, labels: Path, *extra: str) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        None,
        [
            f"partition={partition}",
            f"kmeans={labels}",
            "model.preset=tiny",
            "local_steps=2",
            "train.device=cpu",
            "train.data.min_seconds=1",
            "train.data.max_seconds=2",
            "train.data.batch_seconds=6",
            "train.optim.lr=0.002",
            "train.optim.warmup_steps=1",
            "train.optim.total_steps=10",
            *extra,
        ],
    )


def message(cfg: PretrainConfig, out: Path, client: int, round_: int, local_head: bool) -> Message:
    torch.manual_seed(cfg.seed)
    state = build_hubert(cfg.model, SMALL_K).state_dict()
    shared = {k: v for k, v in state.items() if not (local_head and k in LABEL_HEAD_KEYS)}
    info = {
        "round": round_,
        "global_step": 0,
        "sampled": 2,
        "client": client,
        "out": str(out),
        "threads": 0,
        "num_classes": SMALL_K,
        "label_rate": 100,
        "local_head": local_head,
    }
    content = RecordDict(
        {"arrays": encode(shared, "float32"), "config": config_to_record(cfg), "round": ConfigRecord(info)}
    )
    sent = Message(content, dst_node_id=7, message_type="train")
    sent.metadata.__dict__["_message_id"] = f"m{client}-{round_}"
    return sent


def node(partition_id: int) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": partition_id, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )


def reply_of(cfg: PretrainConfig, out: Path, client: int, local_head: bool, partition_id: int = 0) -> tuple[dict, dict]:
    reply = train_round(message(cfg, out, client, 1, local_head), node(partition_id))
    measured = ("time_s", "per_second", "peak_memory")  # how fast and how big, not what was computed
    metrics = {k: v for k, v in reply.content["metrics"].items() if not any(m in k for m in measured)}
    return decode(reply.content["arrays"], "float32"), metrics


@pytest.mark.parametrize("local_head", [False, True])
def test_a_reused_model_replies_as_a_fresh_one(small_partition, small_labels, tmp_path, local_head):
    cfg = settings(small_partition, small_labels)
    local._BUILT.clear()
    fresh_arrays, fresh_metrics = reply_of(cfg, tmp_path / "fresh", 1, local_head)
    local._BUILT.clear()
    reply_of(cfg, tmp_path / "reused", 0, local_head)  # the process serves client 0 first, then client 1
    assert len(local._BUILT) == 1
    # ... the second through another node of the pool (another partition-id): still the same model
    reused_arrays, reused_metrics = reply_of(cfg, tmp_path / "reused", 1, local_head, partition_id=1)
    assert len(local._BUILT) == 1  # built once for both clients
    assert reused_metrics == fresh_metrics and reused_metrics["client"] == 1
    assert fresh_arrays.keys() == reused_arrays.keys()
    assert all(torch.equal(fresh_arrays[k], reused_arrays[k]) for k in fresh_arrays)
    if local_head:  # each client's own head, in its own folder
        assert sorted(p.name for p in (tmp_path / "reused" / "clients").iterdir()) == ["client_0", "client_1"]


def test_validation_is_bounded_to_the_same_first_utterances(small_partition, small_labels, tmp_path):
    cfg = settings(small_partition, small_labels)
    place = local.ClientPlace(0, small_partition, small_labels, tmp_path)
    utts = load_utterances([place.pair("valid")], SMALL_K, cfg.train.data, LabelRate(100, cfg.model))
    assert len(utts) >= 2
    first = utts[0].num_samples / 16000
    assert local.validation_subset(utts, first) == utts[:1]
    assert local.validation_subset(utts, first / 2) == utts[:1]  # at least one
    assert local.validation_subset(utts, 1e9) == utts
    local._BUILT.clear()
    _, unbounded = reply_of(cfg, tmp_path / "all", 0, False)
    _, none = reply_of(settings(small_partition, small_labels, "valid_seconds=0"), tmp_path / "none", 0, False)
    assert "valid_loss" in unbounded and "valid_loss" not in none
