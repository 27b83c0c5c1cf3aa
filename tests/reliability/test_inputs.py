"""Hostile inputs, damaged after the partition was made (as files rot or get replaced on shared storage): each
stage stops with a clear error naming the file and the fix (exit 2, never a bare traceback) and never writes a
silently wrong result; the inputs themselves are never modified."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from common import KMEANS_FAST, run_cli
from fedhubert.manifest import read_manifest

STAGE_ARGS = {
    "partition": ["--corpus", "/nonexistent"],
    "kmeans": ["--partition", "/nonexistent"],
    "pretrain": ["--partition", "/nonexistent", "--kmeans", "/nonexistent"],
    "distill": ["--teacher", "/nonexistent.pt", "--partition", "/nonexistent"],
}


@pytest.fixture
def corpus_copy(small_librispeech, small_partition, tmp_path) -> tuple[Path, Path]:
    """A copy of the corpus and of its partition, whose manifests point into the copy."""
    corpus = tmp_path / "corpus"
    shutil.copytree(small_librispeech, corpus)
    partition = tmp_path / "partition"
    shutil.copytree(small_partition, partition)
    for manifest in partition.glob("client_*/*.tsv"):
        lines = manifest.read_text().splitlines()
        root = Path(lines[0])
        lines[0] = str(corpus / root.relative_to(small_librispeech))
        manifest.write_text("\n".join(lines) + "\n")
    return corpus, partition


def first_audio(partition: Path, client: int = 1) -> Path:
    return read_manifest(partition / f"client_{client}" / "train.tsv").audio_path(0)


def kmeans(partition: Path, out: Path, *args: str) -> int:
    return run_cli("kmeans", "--partition", partition, "--out", out, *KMEANS_FAST, "reference=false", *args)


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-2000:]


def damage_truncate(path: Path) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return "truncated"


def damage_sample_rate(path: Path) -> str:
    wav, _ = sf.read(path)
    sf.write(path, wav[::2], 8000, format="FLAC")
    return "sample rate 8000 Hz (expected 16000)"


def damage_stereo(path: Path) -> str:
    wav, rate = sf.read(path)
    sf.write(path, np.stack([wav, wav], axis=1), rate, format="FLAC")
    return "2 channels (expected mono)"


def damage_empty(path: Path) -> str:
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", "-b", "16", str(path), "trim", "0", "0"], check=True)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("damage", [damage_truncate, damage_sample_rate, damage_stereo, damage_empty])
def test_damaged_audio_stops_kmeans_with_the_file_named(damage, corpus_copy, tmp_path, capsys, intact):
    corpus, partition = corpus_copy
    victim = first_audio(partition)
    expected = damage(victim)
    intact(corpus, partition)
    assert kmeans(partition, tmp_path / "km") == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert "cannot be featurised" in err and victim.name in err and expected in err
    assert not list((tmp_path / "km").glob("client_*/*.km")), "no labels from a partly featurised client"


@pytest.mark.slow
def test_nan_in_cached_features_leaves_the_client_out_named_with_its_file(
    small_partition, small_kmeans, tmp_path, capsys, intact
):
    """A corrupt client is a counted, logged skip (partial participation), never a label: its reason is the
    client's own message, without Ray's traceback around it. The features are a copy of the cache small_kmeans
    filled (whichever pytest-xdist worker built it)."""
    features = tmp_path / "features"
    shutil.copytree(yaml.safe_load((small_kmeans / "config.yaml").read_text())["feature_dir"], features)
    feats = next(features.glob("client_1/train.feats.npy"))
    array = np.load(feats, mmap_mode="r+")
    array[5, 3] = np.nan
    array.flush()
    del array
    intact(small_partition)
    assert kmeans(small_partition, tmp_path / "km", f"feature_dir={features}") == 0
    err = capsys.readouterr().err
    assert "1 of 3 clients were left out of k-means" in err
    (failed,) = json.loads((tmp_path / "km" / "kmeans.json").read_text())["failed_clients"]
    assert failed["client"] == 1 and failed["stage"] == "kmeans_init"
    assert "frame 5 holds NaN or infinite values" in failed["reason"] and str(feats) in failed["reason"]
    assert "Traceback" not in failed["reason"] and "ray::" not in failed["reason"]
    assert not list((tmp_path / "km" / "client_1").glob("*.km"))
    assert (tmp_path / "km" / "client_0" / "train.km").exists()


def test_nan_samples_in_a_float_wav_are_refused(tmp_path):
    from fedhubert.audio import AudioError, read_audio

    wav = np.zeros(16000, dtype=np.float32)
    wav[123] = np.nan
    sf.write(tmp_path / "nan.wav", wav, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"NaN or infinite samples \(sample 123\)"):
        read_audio(tmp_path / "nan.wav")


@pytest.mark.slow
def test_a_manifest_pointing_outside_the_corpus_is_refused(corpus_copy, tmp_path, capsys):
    _, partition = corpus_copy
    manifest = partition / "client_0" / "train.tsv"
    lines = manifest.read_text().splitlines()
    lines[1] = "../../../../etc/passwd\t16000"
    manifest.write_text("\n".join(lines) + "\n")
    assert kmeans(partition, tmp_path / "km") == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert "'../../../../etc/passwd' must be relative to the manifest root and stay inside it" in err


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, message",
    [
        ("drop_line", "lines but its manifest"),
        ("short_line", "labels, shorter than the"),
    ],
)
def test_labels_that_do_not_fit_the_audio_stop_local_training(
    damage, small_partition, small_labels, tmp_path, capsys, intact, message
):
    labels = tmp_path / "train.km"
    lines = (small_labels / "client_0" / "train.km").read_text().splitlines()
    if damage == "drop_line":
        lines = lines[:-1]
    else:
        lines[2] = " ".join(lines[2].split()[: len(lines[2].split()) // 2])
    labels.write_text("\n".join(lines) + "\n")
    intact(labels, small_partition)
    manifest = small_partition / "client_0" / "train.tsv"
    assert (
        run_cli(
            "train-local",
            "--out",
            tmp_path / "run",
            "--preset",
            "tiny",
            "--steps",
            "1",
            "num_classes=20",
            f"train_manifests=[{manifest}]",
            f"train_labels=[{labels}]",
            "train.device=cpu",
        )
        == 2
    )
    err = capsys.readouterr().err
    no_traceback(err)
    assert message in err and str(labels) in err


@pytest.mark.parametrize("stage", sorted(STAGE_ARGS))
@pytest.mark.parametrize(
    "text, message",
    [
        ("seeed: 3\n", "unknown key 'seeed'"),
        ("seed: three\n", "'seed'"),
    ],
)
def test_bad_config_files_name_the_key_and_the_file(stage, text, message, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert run_cli(stage, *STAGE_ARGS[stage], "--out", tmp_path / "out", "--config", config) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert message in err and str(config) in err
    assert not (tmp_path / "out").exists(), "nothing is written before the config is valid"
