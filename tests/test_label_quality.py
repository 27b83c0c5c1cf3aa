"""Label quality (labels/quality.py) on hand-made labels with known answers, and kmeans.json's record of it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedhubert.labels.config import KMeansConfig
from fedhubert.labels.federated import client_place
from fedhubert.labels.quality import (
    METRICS,
    add_counts,
    read_speaker_counts,
    speaker_counts,
    speaker_warning,
    split_quality,
)
from fedhubert.labels.run import _label_quality
from fedhubert.labels.speakers import SpeakerError
from fedhubert.manifest import ManifestError


def quality(labels, speakers, k: int, train_usage=None) -> dict:
    return split_quality(speaker_counts(np.asarray(labels), np.asarray(speakers), k), k, train_usage)


def test_labels_independent_of_the_speaker_carry_no_speaker_information():
    rng = np.random.default_rng(0)
    q = quality(rng.integers(0, 10, 200_000), rng.integers(0, 8, 200_000), 10)
    assert q["entropy_nats"] == pytest.approx(math.log(10), abs=1e-3)
    assert q["speaker_mi_nats"] < 1e-3 and q["speaker_mi_share"] < 1e-3
    assert q["speaker_dominated_clusters"] == 0 and q["clusters_used"] == 10 and q["speakers"] == 8
    assert speaker_warning("train", q) is None


def test_labels_that_are_the_speaker_carry_all_of_their_entropy_about_it():
    speakers = np.repeat([11, 22, 33, 44], [100, 200, 300, 400])
    labels = np.searchsorted([11, 22, 33, 44], speakers)
    q = quality(labels, speakers, 6)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert q["entropy_nats"] == pytest.approx(-(p * np.log(p)).sum())
    assert q["speaker_mi_nats"] == pytest.approx(q["entropy_nats"]) and q["speaker_mi_share"] == pytest.approx(1)
    assert (q["speaker_dominated_clusters"], q["clusters_used"], q["frames"]) == (4, 4, 1000)
    warning = speaker_warning("train", q)
    assert "4 of 4 clusters" in warning and "features.normalize=utterance" in warning


def test_mutual_information_of_a_half_determined_labelling():
    # speaker 0 always in cluster 0; speaker 1 evenly in clusters 1 and 2: H = 1.5 ln 2, I = ln 2, share 2/3
    q = quality([0] * 4 + [1, 2] * 2, [0] * 4 + [1] * 4, 3)
    assert q["entropy_nats"] == pytest.approx(1.5 * math.log(2))
    assert q["speaker_mi_nats"] == pytest.approx(math.log(2))
    assert q["speaker_mi_share"] == pytest.approx(2 / 3)


def test_a_cluster_is_dominated_only_with_more_than_half_of_its_frames_from_one_speaker():
    labels = [0] * 10 + [1] * 10 + [2] * 3 + [3] * 6
    speakers = [7] * 6 + [8] * 4 + [7] * 5 + [8] * 5 + [8] * 3 + [7, 8, 9] * 2
    q = quality(labels, speakers, 5)
    assert (q["speaker_dominated_clusters"], q["clusters_used"]) == (2, 4), "clusters 0 (60%) and 2 (100%)"


def test_speaker_information_warns_even_without_dominated_clusters():
    speakers = np.repeat(np.arange(8), 50)
    q = quality(speakers // 2, speakers, 4)  # each cluster: two speakers, half each
    assert q["speaker_dominated_clusters"] == 0
    assert q["speaker_mi_nats"] == pytest.approx(math.log(4)) and q["speaker_mi_share"] == pytest.approx(1)
    assert "0 of 4 clusters" in speaker_warning("client_2/train", q)


def test_share_of_frames_in_clusters_unseen_in_training():
    train = speaker_counts(np.array([0, 0, 0, 2, 2]), np.array([1, 1, 2, 2, 2]), 3)
    usage = sum(train.values())
    assert list(usage) == [3, 0, 2]
    q = quality([0, 1, 1, 2, 0, 2, 2, 2], [5] * 8, 3, train_usage=usage)
    assert q["unseen_in_train_share"] == pytest.approx(0.25)
    assert split_quality(train, 3)["unseen_in_train_share"] is None, "the training split itself"


def test_an_empty_split_has_no_ratios_and_no_warning():
    q = split_quality({}, 4, np.ones(4))
    assert q["frames"] == 0 and all(
        q[key] is None for key in METRICS if key not in ("frames", "speakers", "clusters_used")
    )
    assert speaker_warning("valid", q) is None


def test_counts_add_up_over_files():
    total = speaker_counts(np.array([0, 1]), np.array([3, 4]), 2)
    add_counts(total, speaker_counts(np.array([1, 1]), np.array([3, 5]), 2))
    assert {s: list(c) for s, c in total.items()} == {3: [1, 1], 4: [0, 1], 5: [0, 1]}


def write_split(folder: Path, names: list[str], lines: list[str]) -> tuple[Path, Path]:
    manifest = folder / "train.tsv"
    manifest.write_text(
        "\n".join(["/corpus"] + [f"train-clean-100/{n.split('-')[0]}/1/{n}\t1200" for n in names]) + "\n"
    )
    labels = folder / "train.km"
    labels.write_text("".join(f"{line}\n" for line in lines))
    return labels, manifest


def test_label_files_are_read_with_the_speakers_of_their_manifest_rows(tmp_path):
    labels, manifest = write_split(
        tmp_path, ["19-1-0000.flac", "19-1-0001.flac", "250-1-0000.flac"], ["0 0 1", "1 2 2", "2 2 2"]
    )
    counts = read_speaker_counts(labels, manifest, 3)
    assert {s: list(c) for s, c in counts.items()} == {19: [2, 2, 2], 250: [0, 0, 3]}
    labels.write_text("0 0 1\n1 2 2\n")
    with pytest.raises(ManifestError, match="has 2 lines but its manifest"):
        read_speaker_counts(labels, manifest, 3)
    labels.write_text("0 0 1\n1 2 2\n2 3 2\n")
    with pytest.raises(ManifestError, match=r"train.km: cluster ids must lie in 0..2"):
        read_speaker_counts(labels, manifest, 3)
    labels, manifest = write_split(tmp_path, ["19-1-0000.flac", "take-two.flac"], ["0", "1"])
    with pytest.raises(SpeakerError, match=r"train.tsv:3: .*take-two.flac' is not named <speaker>-<chapter>"):
        read_speaker_counts(labels, manifest, 3)


def test_against_a_superlink_the_record_is_null_with_the_reason(tmp_path):
    cfg = KMeansConfig(partition=tmp_path / "partition")
    clients = [client_place(cfg, tmp_path, i) for i in range(3)]
    record = _label_quality(cfg, tmp_path, clients, ["dev-clean"], simulation=False)
    assert set(record["splits"]) == {"train", "valid", "global/dev-clean"}
    assert all(value is None for split in record["splits"].values() for value in split.values())
    assert "federation.superlink is set" in record["reason"] and "clients' machines" in record["reason"]
    assert json.loads(json.dumps(record)) == record
