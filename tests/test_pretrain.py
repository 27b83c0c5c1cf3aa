"""`fedhubert pretrain`: real Flower simulations of a few tiny clients, exact resume, what travels on the wire,
per-client heads, failing clients, and the iteration-2 relabelling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common import PRETRAIN_FAST as FAST, rows, run_cli
from fedhubert.config import load_config
from fedhubert.fl.local import heads_to_keep, save_head
from fedhubert.fl.records import read_messages
from fedhubert.manifest import read_manifest
from fedhubert.model.checkpoint import load_checkpoint
from fedhubert.model.config import ModelConfig
from fedhubert.model.frames import feature_frames
from fedhubert.model.hubert import LABEL_HEAD_KEYS, build_hubert

pytestmark = pytest.mark.slow
TINY = load_config(ModelConfig, None, ["preset=tiny"])


def pretrain(partition: Path, kmeans: Path, out: Path, *args: str) -> int:
    return run_cli("pretrain", "--partition", partition, "--kmeans", kmeans, "--out", out, *FAST, *args)


def messages(out: Path) -> list[dict]:
    return read_messages(out / "messages.jsonl")


def test_the_global_model_trains_and_dev_accuracy_is_reported(four_rounds):
    final = load_checkpoint(four_rounds / "checkpoints" / "final.pt", kind="hubert")
    torch.manual_seed(0)
    initial = build_hubert(TINY, 16).state_dict()
    changed = [k for k, v in final["state_dict"].items() if not torch.equal(v, initial[k])]
    assert len(changed) > 0.9 * len(initial), "the aggregated model moved away from the initial one"
    assert final["state"]["round"] == 4 and final["state"]["global_step"] == 12
    assert final["state"]["strategy"]["name"] == "fedadam" and "m_t" in final["state"]["strategy"]
    evals = rows(four_rounds, "eval")
    assert [r["round"] for r in evals] == [0, 1, 2, 3, 4]
    assert all(0 <= r["acc_masked"] <= 1 for r in evals) and evals[-1]["loss"] < evals[0]["loss"]
    clients = rows(four_rounds, "client")
    assert [len([r for r in clients if r["round"] == n]) for n in range(1, 5)] == [2, 2, 2, 2], "60% of 3 clients"
    assert all("valid_acc_masked" in r and r["train_time_s"] > 0 for r in clients)
    names = {p.name for p in (four_rounds / "checkpoints").iterdir()}
    kept = {f"round_0000{r}.pt" for r in (2, 3, 4)} | {"best.pt", "final.pt"}
    assert names == kept | {f"{name}.sha256" for name in kept}, "checkpoint_keep=3: round 1's went with its sidecar"
    assert list((four_rounds / "tensorboard").glob("events.out.tfevents.*"))
    assert (four_rounds / "pretrain.png").is_file()
    summary = json.loads((four_rounds / "run.json").read_text())["summary"]
    assert summary["rounds"] == 4 and summary["best"]["round"] >= 1
    left = ("late_replies_so_far", "stragglers_held", "link_instructions", "link_replies", "link_objects")
    assert [[r[k] for k in left] for r in rows(four_rounds, "train")] == [[0] * 5] * 4, "nothing left in the link"


def test_weights_travel_as_float32_and_weigh_the_model(four_rounds):
    size = sum(v.numel() * 4 for v in build_hubert(TINY, 16).state_dict().values())
    train = [m for m in messages(four_rounds) if m["type"] == "train"]
    assert len(train) == 2 * 8, "2 clients x 4 rounds, both directions"
    for message in train:
        assert {a["dtype"] for a in message["arrays"].values()} == {"float32"}
        headers = 128 * len(message["arrays"])  # each array travels as a .npy with a 128-byte header
        assert size <= message["bytes"] <= size + headers and message["num_arrays"] == len(message["arrays"])
    lines = [json.loads(line) for line in (four_rounds / "messages.jsonl").read_text().splitlines()]
    schemas = [line for line in lines if line["kind"] == "schema"]
    assert len({s["schema"] for s in schemas}) == len(schemas) <= 4, "each schema once (to and from, per type)"
    assert all(len(json.dumps(line)) < 400 for line in lines if line["kind"] == "message"), "rows carry totals"


def test_a_resumed_run_ends_with_the_same_weights(four_rounds, small_partition, small_kmeans, tmp_path):
    """A schedule fitted to 2 rounds would decay to 0 by round 2, so the first run pins the one a 4-round run fits
    (12 updates, 1 of warm-up): extending a run with a fitted schedule refits it, which the log says."""
    out = tmp_path / "two-then-four"
    assert (
        pretrain(
            small_partition,
            small_kmeans,
            out,
            "--rounds",
            "2",
            "strategy.fraction=0.6",
            "strategy.name=fedadam",
            "train.optim.total_steps=12",
            "train.optim.warmup_steps=1",
        )
        == 0
    )
    assert run_cli("pretrain", "--resume", out, "num_rounds=4") == 0
    a = load_checkpoint(four_rounds / "checkpoints" / "final.pt")["state_dict"]
    b = load_checkpoint(out / "checkpoints" / "final.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(four_rounds, "eval")] == [r["loss"] for r in rows(out, "eval")]
    assert json.loads((out / "run.json").read_text())["summary"]["resumed_after_round"] == 2


TIMING = ("time_s", "per_second", "peak_memory")


def client_rows(run: Path) -> list[dict]:
    """The client rows of a run without what depends on the machine's speed, in (round, client) order."""
    untimed = [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows(run, "client")]
    return sorted(untimed, key=lambda r: (r["round"], r["client"]))


def test_one_supernode_serving_every_client_trains_as_one_supernode_per_client(
    four_rounds, small_partition, small_kmeans, tmp_path, caplog
):
    """four_rounds runs with one SuperNode per client. One SuperNode serving all 3 clients in turn (virtual
    clients: one client process, its model built once and reused) ends with the same weights, evaluations and
    client rows."""
    out = tmp_path / "one-node"
    caplog.set_level("INFO", logger="fedhubert")
    assert (
        pretrain(
            small_partition,
            small_kmeans,
            out,
            "--rounds",
            "4",
            "strategy.fraction=0.6",
            "strategy.name=fedadam",
            "federation.supernodes=1",
        )
        == 0
    )
    assert "3 clients served by 1 SuperNode(s)" in caplog.text
    a = load_checkpoint(four_rounds / "checkpoints" / "final.pt")["state_dict"]
    b = load_checkpoint(out / "checkpoints" / "final.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(four_rounds, "eval")] == [r["loss"] for r in rows(out, "eval")]
    assert client_rows(four_rounds) == client_rows(out)
    assert len({m["node"] for m in messages(four_rounds) if m["type"] == "train"}) == 3
    assert len({m["node"] for m in messages(out) if m["type"] == "train"}) == 1


def test_resume_keeps_the_config(four_rounds, capsys):
    assert run_cli("pretrain", "--resume", four_rounds, "seed=5") == 2
    assert "only num_rounds, federation, checkpoint_keep may be overridden" in capsys.readouterr().err


def test_per_client_heads_never_leave_their_clients_and_bf16_halves_the_bytes(
    small_partition, per_client_kmeans, tmp_path
):
    kmeans = per_client_kmeans
    out = tmp_path / "pretrain"
    assert pretrain(small_partition, kmeans, out, "--rounds", "3", "transfer=bfloat16", "checkpoint_keep=1") == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["final.pt", "round_00003.pt"]
    for i in range(3):  # each client kept the heads the kept checkpoint (round 3) and its successor can resume from
        assert sorted(p.name for p in (out / "clients" / f"client_{i}").glob("head_round_*.pt")) == [
            "head_round_00002.pt",
            "head_round_00003.pt",
        ]
    size = sum(v.numel() * 4 for k, v in build_hubert(TINY, 16).state_dict().items() if k not in LABEL_HEAD_KEYS)
    for message in (m for m in messages(out) if m["type"] == "train"):
        names = {n.split(".", 1)[1] for n in message["arrays"]}
        assert not names & set(LABEL_HEAD_KEYS), "the label head is never sent"
        assert {a["dtype"] for a in message["arrays"].values()} == {"uint16"}
        assert size / 2 <= message["bytes"] <= size / 2 + 128 * len(message["arrays"])
    heads = [
        torch.load(sorted((out / "clients" / f"client_{i}").glob("head_round_*.pt"))[-1], weights_only=True)
        for i in range(3)
    ]
    assert not torch.equal(heads[0]["logit_generator.label_embeddings"], heads[1]["logit_generator.label_embeddings"])
    final = load_checkpoint(out / "checkpoints" / "final.pt")
    assert final["state"]["label_head"] == "local" and set(final["state"]["client_heads"]) == {"0", "1", "2"}
    assert all((out / head).is_file() for head in final["state"]["client_heads"].values())
    assert rows(out, "eval") == [], "no shared labels: no server-side evaluation"


def test_a_client_keeps_the_heads_that_the_kept_checkpoints_resume_from(tmp_path):
    """With checkpoint_keep the server names its round checkpoints; a client that trained in rounds 1, 2, 5 and 7
    keeps its newest head and, for checkpoints 4 and 6, the newest head up to each (2 and 5)."""
    assert heads_to_keep([1, 2, 5, 7], [4, 6]) == {2, 5, 7}
    assert heads_to_keep([3], []) == {3}
    state = {"w": torch.ones(2)}
    for r in (1, 2, 5):
        save_head(tmp_path, r, state, ["w"], keep_every=1, checkpoint_rounds=[1, 2, 4])
    save_head(tmp_path, 7, state, ["w"], keep_every=1, checkpoint_rounds=[4, 6])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"head_round_0000{r}.pt" for r in (2, 5, 7)]
    save_head(tmp_path, 8, state, ["w"], keep_every=3)  # without checkpoint_keep: the last two and multiples of 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"head_round_0000{r}.pt" for r in (7, 8)]


def test_a_failing_client_is_left_out(small_partition, small_kmeans, tmp_path):
    """A client whose labels do not match its audio fails its round, named, and the others train. (Too few clients
    to go on: tests/reliability/test_clients.py, test_a_run_stopped_in_round_one_resumes.)"""
    kmeans = tmp_path / "kmeans"
    shutil.copytree(small_kmeans, kmeans, ignore=shutil.ignore_patterns("flwr", "features"))
    broken = kmeans / "client_2" / "train.km"
    broken.write_text("\n".join(broken.read_text().splitlines()[:-1]) + "\n")  # one line short: client 2 fails
    out = tmp_path / "left-out"
    assert pretrain(small_partition, kmeans, out, "--rounds", "1") == 0
    [failure] = rows(out, "failure")
    assert failure["client"] == 2 and "lines but its manifest" in failure["reason"]
    assert rows(out, "train")[0]["clients"] == 2


def test_iteration_two_relabels_from_a_checkpoint_and_pretrains_again(
    four_rounds, small_partition, kmeans_features, tmp_path
):
    relabelled = tmp_path / "kmeans-it2"
    assert (
        run_cli(
            "kmeans",
            "--partition",
            small_partition,
            "--out",
            relabelled,
            "--features",
            "hubert",
            "--checkpoint",
            four_rounds / "checkpoints" / "final.pt",
            "--layer",
            "1",
            "--clusters",
            "8",
            "sample_fraction=1.0",
            "minibatch.n_init=2",
            f"feature_dir={kmeans_features}",
        )
        == 0
    )
    record = json.loads((relabelled / "kmeans.json").read_text())
    assert record["label_rate"] == 50 and record["features"]["kind"] == "hubert" and record["features"]["dims"] == 64
    manifest = read_manifest(small_partition / "client_0" / "train.tsv")
    lines = (relabelled / "client_0" / "train.km").read_text().splitlines()
    assert [len(line.split()) for line in lines] == [feature_frames(e.num_samples, TINY) for e in manifest.entries]
    out = tmp_path / "pretrain-it2"
    assert pretrain(small_partition, relabelled, out, "--rounds", "1") == 0
    final = load_checkpoint(out / "checkpoints" / "final.pt")
    assert final["num_classes"] == 8 and final["state"]["label_rate"] == 50
    assert np.isfinite(rows(out, "eval")[-1]["loss"])


def test_flwr_run_of_the_repository_works_as_flower_users_expect(small_partition, small_kmeans, tmp_path):
    """`flwr run .` on the repository (its pyproject declares the app), against a simulation SuperLink."""
    from fedhubert.config import absolute_paths, save_config
    from fedhubert.fl.config import FederationConfig
    from fedhubert.fl.runtime.federation import run_flower_app
    from fedhubert.pretrain.config import PretrainConfig

    repo = Path(__file__).resolve().parents[1]
    config = absolute_paths(
        load_config(
            PretrainConfig,
            None,
            [
                f"partition={small_partition}",
                f"kmeans={small_kmeans}",
                "num_rounds=1",
                "model.preset=tiny",
                "local_steps=2",
                "train.device=cpu",
                "train.data.min_seconds=1",
                "train.data.max_seconds=3",
                "train.data.batch_seconds=12",
            ],
        )
    )
    out = tmp_path / "flwr-run"
    save_config(config, tmp_path / "pretrain.yaml")
    run_flower_app({"config": str(tmp_path / "pretrain.yaml"), "out": str(out)}, out, 3, FederationConfig(app=repo))
    summary = json.loads((out / "pretrain.json").read_text())
    assert summary["rounds"] == 1 and (out / "checkpoints" / "final.pt").is_file()


def test_labels_of_another_partition_name_the_command_that_makes_the_right_ones(tmp_path):
    from fedhubert.errors import ConfigError
    from fedhubert.pretrain.config import PretrainConfig
    from fedhubert.pretrain.server import read_inputs

    partition, kmeans = tmp_path / "partition", tmp_path / "kmeans"
    for folder, name, record in (
        (partition, "partition.json", {}),
        (kmeans, "kmeans.json", {"partition": {"path": "/x"}}),
    ):
        folder.mkdir()
        (folder / name).write_text(json.dumps(record))
    cfg = load_config(PretrainConfig, None, [f"partition={partition}", f"kmeans={kmeans}"])
    with pytest.raises(ConfigError) as err:
        read_inputs(cfg)
    assert f"labels the partition /x, not {partition}" in str(err.value)
    assert f"'fedhubert kmeans --partition {partition} --out DIR', then pass --kmeans DIR" in str(err.value)
