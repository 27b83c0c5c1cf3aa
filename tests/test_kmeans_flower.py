"""`fedhubert kmeans` end to end: real Flower simulations (SuperLink in simulation mode, Ray clients)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from common import KMEANS_FAST as FAST, run_cli
from fedhubert.fl.records import read_messages
from fedhubert.manifest import read_manifest
from fedhubert.model.frames import mfcc_frames as num_frames

pytestmark = pytest.mark.slow


@pytest.fixture()
def federated(small_kmeans) -> Path:
    return small_kmeans


@pytest.fixture()
def features(kmeans_features) -> Path:
    return kmeans_features


def test_labels_align_with_manifests_and_match_a_centralized_codebook(federated, small_partition):
    record = json.loads((federated / "kmeans.json").read_text())
    assert record["mode"] == "federated" and record["label_head"] == "shared" and record["num_clusters"] == 16
    assert np.load(federated / "codebook.npy").shape == (16, 39)
    for client in range(3):
        for split in ("train", "valid"):
            manifest = read_manifest(small_partition / f"client_{client}" / f"{split}.tsv")
            lines = (federated / f"client_{client}" / f"{split}.km").read_text().splitlines()
            assert len(lines) == len(manifest)
            for line, entry in zip(lines, manifest.entries, strict=True):
                ids = [int(x) for x in line.split()]
                assert len(ids) == num_frames(entry.num_samples) and all(0 <= i < 16 for i in ids)
    assert record["reference"]["relative_gap"] < 0.03, "federated inertia within 3% of centralized"
    assert record["unused_clusters"] == 0 and min(record["cluster_usage"]) > 0, "every cluster used"
    assert 1 <= record["rounds"] <= 50 and record["history"][-1]["inertia"] <= record["history"][0]["inertia"]
    partition = json.loads((small_partition / "partition.json").read_text())
    for client in record["clients"]:
        expected = partition["clients"][client["client"]]["manifests"]
        assert client["manifests"] == {k: v for k, v in expected.items() if k.endswith(".tsv")}
    run = json.loads((federated / "run.json").read_text())
    assert run["status"] == "completed" and run["summary"]["mode"] == "federated"


def frames_by_cluster_and_speaker(pairs: list[tuple[Path, Path]]) -> Counter:
    counts: Counter = Counter()
    for labels, manifest in pairs:
        entries = read_manifest(manifest).entries
        for line, entry in zip(labels.read_text().splitlines(), entries, strict=True):
            speaker = Path(entry.path).name.split("-")[0]
            counts.update((int(label), speaker) for label in line.split())
    return counts


def test_label_quality_is_recorded_per_split_and_agrees_with_the_label_files(federated, small_partition):
    record = json.loads((federated / "kmeans.json").read_text())
    quality = record["label_quality"]
    assert quality["reason"] is None
    assert set(quality["splits"]) == {"train", "valid"} | {f"global/{s}" for s in record["global"]}
    pairs = {
        split: [
            (federated / f"client_{i}" / f"{split}.km", small_partition / f"client_{i}" / f"{split}.tsv")
            for i in range(3)
        ]
        for split in ("train", "valid")
    }
    pairs |= {
        f"global/{s}": [(federated / "global" / f"{s}.km", small_partition / "global" / f"{s}.tsv")]
        for s in record["global"]
    }
    train_clusters = {label for label, _ in frames_by_cluster_and_speaker(pairs["train"])}
    for name, files in pairs.items():
        counts, got = frames_by_cluster_and_speaker(files), quality["splits"][name]
        frames = sum(counts.values())
        per_cluster: Counter = Counter()
        per_speaker: Counter = Counter()
        for (label, speaker), n in counts.items():
            per_cluster[label] += n
            per_speaker[speaker] += n
        entropy = -sum(n / frames * math.log(n / frames) for n in per_cluster.values())
        mutual = sum(
            n / frames * math.log(n * frames / (per_cluster[label] * per_speaker[speaker]))
            for (label, speaker), n in counts.items()
        )
        dominated = sum(
            max(n for (c, _), n in counts.items() if c == label) > total / 2 for label, total in per_cluster.items()
        )
        assert got["frames"] == frames and got["clusters_used"] == len(per_cluster)
        assert got["entropy_nats"] == pytest.approx(entropy) and got["speaker_dominated_clusters"] == dominated
        assert got["speaker_mi_nats"] == pytest.approx(mutual) and 0 < mutual <= entropy
        assert got["speaker_mi_share"] == pytest.approx(mutual / entropy)
        assert got["speakers"] == len(per_speaker)
        if name == "train":
            assert got["unseen_in_train_share"] is None
            assert frames == sum(c["frames"]["train"] for c in record["clients"])
        else:
            unseen = sum(n for label, n in per_cluster.items() if label not in train_clusters) / frames
            assert got["unseen_in_train_share"] == pytest.approx(unseen)


def test_only_cluster_statistics_cross_the_wire(federated):
    messages = read_messages(federated / "messages.jsonl")
    frames = [sum(c["frames"].values()) for c in json.loads((federated / "kmeans.json").read_text())["clients"]]
    received = [m for m in messages if m["direction"] == "from_client"]
    assert {m["type"] for m in received} == {"query.kmeans_init", "query.kmeans_stats", "query.kmeans_labels"}
    assert all("error" not in m for m in received)
    for message in received:
        for name, array in message["arrays"].items():
            assert array["shape"][0] <= 16, f"{name} {array['shape']}: nothing frame-sized leaves a client"
            assert array["shape"] in ([16, 39], [16]) or (
                message["type"] == "query.kmeans_init" and array["shape"][1:] in ([39], [])
            ), name
            assert array["shape"][0] not in frames
        assert message["bytes"] <= 16 * 39 * 8 * 3 + 1024
    for message in (m for m in received if m["type"] == "query.kmeans_stats"):
        assert {name: a["dtype"] for name, a in message["arrays"].items()} == {
            "stats.centred_sums": "float32",
            "stats.centred_sumsq": "float32",
            "stats.counts": "int64",
        }, "a Lloyd round's statistics travel centred, in float32"
    sent = [m for m in messages if m["direction"] == "to_client"]
    assert all(set(m["arrays"]) <= {"codebook.centroids"} for m in sent)


def test_per_client_codebooks_stay_with_their_clients(per_client_kmeans):
    out = per_client_kmeans
    record = json.loads((out / "kmeans.json").read_text())
    assert record["mode"] == "per-client" and record["label_head"] == "local" and record["codebook"] is None
    assert not (out / "codebook.npy").exists()
    codebooks = [np.load(out / f"client_{i}" / "codebook.npy") for i in range(3)]
    assert all(c.shape == (16, 39) for c in codebooks)
    assert not np.allclose(codebooks[0], codebooks[1]), "each client fits its own codebook"
    distances = record["reference"]["matched_centroid_distance"]
    assert len(distances) == 3 and all(d > 0 for d in distances)
    messages = read_messages(out / "messages.jsonl")
    assert all(set(m["arrays"]) <= {"stats.usage"} for m in messages if m["direction"] == "from_client")
    quality = record["label_quality"]["splits"]
    assert set(quality) == {f"client_{i}/{split}" for i in range(3) for split in ("train", "valid")}, "per codebook"
    for i in range(3):
        assert quality[f"client_{i}/train"]["frames"] == record["clients"][i]["frames"]["train"]
        assert quality[f"client_{i}/valid"]["unseen_in_train_share"] is not None


def test_too_few_frames_for_k_stops_before_any_flower_run(small_partition, features, tmp_path, capsys):
    out = tmp_path / "too-many-clusters"
    assert (
        run_cli(
            "kmeans",
            "--partition",
            small_partition,
            "--out",
            out,
            "--clusters",
            "100000",
            "sample_fraction=1.0",
            f"feature_dir={features}",
        )
        == 2
    )
    assert "fewer than num_clusters=100000" in capsys.readouterr().err
    assert not (out / "flwr").exists()


def test_features_computed_per_client_ahead_are_reused_by_kmeans(federated, small_partition, tmp_path, capsys):
    """What the Slurm features array does: one `fedhubert features` per client, then kmeans reuses them all; with the
    same seed and settings as the session's federated run, its codebook and every label file are identical."""
    cache = tmp_path / "features"
    for client in range(3):
        assert (
            run_cli(
                "features",
                "--partition",
                small_partition,
                "--client",
                client,
                "--out",
                cache / f"client_{client}",
                "--workers",
                "1",
            )
            == 0
        )
        assert json.loads((cache / f"client_{client}" / "run.json").read_text())["summary"]["computed"] == 2
    out = tmp_path / "kmeans"
    assert run_cli("kmeans", "--partition", small_partition, "--out", out, *FAST, f"feature_dir={cache}") == 0
    assert json.loads((out / "run.json").read_text())["summary"]["features"]["computed"] == 0
    assert json.loads((out / "run.json").read_text())["summary"]["features"]["reused"] == 6
    np.testing.assert_array_equal(np.load(out / "codebook.npy"), np.load(federated / "codebook.npy"))
    for client in range(3):
        for split in ("train", "valid"):
            name = f"client_{client}/{split}.km"
            assert (out / name).read_text() == (federated / name).read_text()
    capsys.readouterr()
    assert run_cli("features", "--partition", small_partition, "--client", 1, "--out", cache / "elsewhere") == 2
    assert "--out must be FEATURE_DIR/client_1 (not elsewhere)" in capsys.readouterr().err
    assert run_cli("features", "--partition", small_partition, "--client", 7, "--out", cache / "client_7") == 2
    assert "client 7 does not exist: the partition has clients 0..2" in capsys.readouterr().err


def test_sampled_lloyd_rounds_are_mini_batch_k_means_stopped_by_patience(small_partition, features, tmp_path):
    """With lloyd.fraction < 1 each round asks a seeded sample, the centroids are running means and the stage
    stops once the smoothed inertia has not improved for `patience` rounds (or at max_rounds)."""
    out = tmp_path / "sampled"
    args = ["lloyd.fraction=0.5", "lloyd.patience=2", "lloyd.tol=0.01", "lloyd.max_rounds=12", "reference=false"]
    assert run_cli("kmeans", "--partition", small_partition, "--out", out, *FAST, f"feature_dir={features}", *args) == 0
    history = json.loads((out / "kmeans.json").read_text())["history"]
    assert {row["clients"] for row in history} == {2}, "half of the 3 clients, rounded up, each round"
    assert all("smoothed_inertia" in row for row in history)
    stale = _stale_counts(history, 0.01)
    assert stale[-1] == 2 or len(history) == 12, "stopped by patience, else by max_rounds"
    assert all(count < 2 for count in stale[:-1]), "not before patience ran out"
    for client in range(3):
        assert (out / f"client_{client}" / "train.km").exists()


def _stale_counts(history: list[dict], tol: float) -> list[int]:
    best, stale, counts = math.inf, 0, []
    for row in history:
        if row["smoothed_inertia"] < best * (1 - tol):
            best, stale = row["smoothed_inertia"], 0
        else:
            stale += 1
        counts.append(stale)
    return counts
