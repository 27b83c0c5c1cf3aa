"""The local trainer on real audio and labels: crops and labels aligned, batches, bad input, training that
trains, and `fedhubert train-local` end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from common import SMALL_K, run_cli
from fedhubert.config import load_config
from fedhubert.errors import ConfigError
from fedhubert.manifest import ManifestEntry, read_manifest, write_manifest
from fedhubert.model.checkpoint import CheckpointError, load_checkpoint, model_config_of
from fedhubert.model.config import ModelConfig
from fedhubert.model.frames import feature_frames, mfcc_frames as num_frames
from fedhubert.model.hubert import build_hubert, cosine_logits
from fedhubert.train.config import DataConfig, LossConfig, TrainConfig
from fedhubert.train.data import Crop, CropBatches, CroppedAudio, DataError, LabelRate, batch_loader, load_utterances
from fedhubert.train.loop import (
    MaskedPrediction,
    TrainingError,
    cycle_batches,
    hubert_loss,
    label_log_prior,
    make_optimizer,
    prediction_metrics,
    train,
)

TINY = load_config(ModelConfig, None, ["preset=tiny"])
MFCC_RATE = LabelRate(100, TINY)
FAST = TrainConfig(
    device="cpu",
    log_every=5,
    optim=load_config(TrainConfig, None, ["optim.lr=2e-3", "optim.warmup_steps=5", "optim.total_steps=500"]).optim,
    data=DataConfig(min_seconds=1.0, max_seconds=4.0, batch_seconds=24.0),
)


def pairs(small_partition: Path, small_labels: Path, split: str, clients=(0, 1, 2)):
    return [
        (small_partition / f"client_{i}" / f"{split}.tsv", small_labels / f"client_{i}" / f"{split}.km")
        for i in clients
    ]


def test_crops_take_the_labels_of_the_same_frames(tmp_path):
    rng = np.random.default_rng(0)
    wav = (rng.standard_normal(16000 * 3) * 0.1).astype(np.float32)
    sf.write(tmp_path / "a.flac", wav, 16000)
    write_manifest(tmp_path / "a.tsv", tmp_path, [ManifestEntry("a.flac", len(wav))])
    frames = num_frames(len(wav))
    (tmp_path / "a.km").write_text(" ".join(str(i % 1000) for i in range(frames)) + "\n")
    [utt] = load_utterances([(tmp_path / "a.tsv", tmp_path / "a.km")], 1000, DataConfig(min_seconds=1), MFCC_RATE)
    dataset = CroppedAudio([utt], MFCC_RATE)
    for start in (0, 320, 3200, 6400):
        audio, labels = dataset[Crop(0, start, 32000)]
        np.testing.assert_allclose(audio.numpy(), wav[start : start + 32000], atol=1 / 32768)
        assert len(labels) == feature_frames(32000, TINY) == 99
        # transformer frame t of a crop at sample s covers MFCC frame s/160 + 2t
        assert labels.tolist() == [(start // 160 + 2 * t) % 1000 for t in range(99)]


def test_batches_fit_the_seconds_budget_and_cover_every_utterance(small_partition, small_labels):
    utts = load_utterances(pairs(small_partition, small_labels, "train"), SMALL_K, FAST.data, MFCC_RATE)
    sampler = CropBatches(utts, FAST.data, seed=0)
    seen = []
    for batch in sampler:
        crop = batch[0].samples
        assert len(batch) * crop <= FAST.data.batch_seconds * 16000 or len(batch) == 1
        assert crop <= FAST.data.max_seconds * 16000
        for c in batch:
            assert c.samples == crop and c.start % 320 == 0 and c.start + crop <= utts[c.index].num_samples
        seen += [c.index for c in batch]
    assert sorted(seen) == list(range(len(utts)))
    capped = CropBatches(utts, FAST.data, seed=0, max_batch_size=lambda samples: 2)
    assert max(len(b) for b in capped) == 2 and len(capped) > len(sampler)
    sampler.set_epoch(1)
    assert [b[0].index for b in sampler] != [b[0].index for b in CropBatches(utts, FAST.data, seed=0)]


def test_labels_shorter_than_the_audio_allows_are_refused(small_partition, small_labels, tmp_path):
    manifest, labels = pairs(small_partition, small_labels, "train", clients=(0,))[0]
    lines = labels.read_text().splitlines()
    lines[3] = " ".join(lines[3].split()[:-5])
    (tmp_path / "short.km").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"short.km:4: \d+ labels, shorter than the \d+ frames"):
        load_utterances([(manifest, tmp_path / "short.km")], SMALL_K, FAST.data, MFCC_RATE)
    (tmp_path / "few.km").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(Exception, match="lines but its manifest"):
        load_utterances([(manifest, tmp_path / "few.km")], SMALL_K, FAST.data, MFCC_RATE)
    with pytest.raises(DataError, match=r"label ids must be in \[0, 5\)"):
        load_utterances([(manifest, labels)], 5, FAST.data, MFCC_RATE)


def test_a_clients_parsed_data_is_reused_until_its_files_change(small_partition, small_labels, tmp_path):
    from fedhubert.fl.local import utterances

    manifest, labels = pairs(small_partition, small_labels, "train", clients=(0,))[0]
    copy = tmp_path / "train.km"
    copy.write_text(labels.read_text())
    pair = (manifest, copy)
    first = utterances(pair, SMALL_K, MFCC_RATE, FAST.data)
    assert utterances(pair, SMALL_K, MFCC_RATE, FAST.data) is first
    shifted = [" ".join(str((int(x) + 1) % SMALL_K) for x in line.split()) for line in labels.read_text().splitlines()]
    copy.write_text("\n".join(shifted) + "\n")
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    again = utterances(pair, SMALL_K, MFCC_RATE, FAST.data)
    assert again is not first
    assert len(again) == len(first)
    assert all(np.array_equal((a.labels + 1) % SMALL_K, b.labels) for a, b in zip(first, again, strict=True))


def test_empty_manifest_is_refused(tmp_path):
    write_manifest(tmp_path / "empty.tsv", tmp_path, [])
    (tmp_path / "empty.km").write_text("")
    with pytest.raises(DataError, match="no utterance of at least"):
        load_utterances([(tmp_path / "empty.tsv", tmp_path / "empty.km")], 10, FAST.data, MFCC_RATE)


def test_the_baseline_accuracy_is_always_predicting_the_most_frequent_training_cluster():
    """Masked frames labelled [2, 2, 2, 0]; the training labels favour cluster 2 (counts [1, 0, 5]), so always
    predicting 2 is right on 3 of the 4 frames: 0.75, whatever the model predicts."""
    torch.manual_seed(0)
    labels = torch.tensor([2, 2, 2, 0])
    logits = cosine_logits(torch.randn(4, 8), labels, torch.randn(3, 8), 0.1)
    prior = label_log_prior(np.array([1, 0, 5]))
    out = hubert_loss(logits, logits[:0], torch.zeros(()), LossConfig(feature_penalty=0), prior)
    assert out.sums["prior_correct_m"] == 3
    metrics = MaskedPrediction(LossConfig(), log_prior=prior).metrics(out.sums)
    assert metrics["baseline_acc_masked"] == 0.75
    without = hubert_loss(logits, logits[:0], torch.zeros(()), LossConfig(feature_penalty=0))
    assert "baseline_acc_masked" not in prediction_metrics(without.sums), "no prior, no baseline"


def test_a_call_that_trains_no_batch_raises():
    model = build_hubert(TINY, 10)
    with pytest.raises(TrainingError, match="no batch was trained"):
        train(
            model,
            iter([]),
            FAST,
            objective=MaskedPrediction(LossConfig()),
            steps=3,
            global_step=0,
            optimizer=make_optimizer(model, FAST.optim),
            device=torch.device("cpu"),
        )


def forty_steps(model, loader, cfg: TrainConfig, optimizer, global_step: int):
    """40 masked-prediction updates on CPU: the result and the loss of each update."""
    history = []
    result = train(
        model,
        cycle_batches(loader),
        cfg,
        objective=MaskedPrediction(LossConfig()),
        steps=40,
        global_step=global_step,
        optimizer=optimizer,
        device=torch.device("cpu"),
        on_step=lambda step, m: history.append(m["loss"]),
    )
    return result, history


@pytest.mark.slow  # trains (or composes) for a minute: make test, not make test-quick
def test_a_few_steps_lower_the_loss_and_change_the_weights(small_partition, small_labels):
    torch.manual_seed(0)
    utts = load_utterances(pairs(small_partition, small_labels, "train"), SMALL_K, FAST.data, MFCC_RATE)
    loader = batch_loader(utts, MFCC_RATE, FAST.data, seed=0)
    model = build_hubert(TINY, SMALL_K)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, FAST.optim)
    result, history = forty_steps(model, loader, FAST, optimizer, global_step=7)
    assert result.global_step == 47 and result.metrics["steps"] == 40
    assert history[-1] < history[0] - 0.5, history
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, initial[k])]
    assert "logit_generator.label_embeddings" in changed and len(changed) > 0.8 * len(initial)
    assert result.metrics["audio_seconds_per_second"] > 0 and result.metrics["peak_memory_mb"] > 0


@pytest.mark.slow  # trains (or composes) for a minute: make test, not make test-quick
def test_sgd_with_momentum_is_the_other_client_optimiser_and_needs_its_own_rate(small_partition, small_labels):
    """optim.name=sgd gives torch's SGD with the configured momentum; the presets' rates are AdamW's, so it needs
    optim.lr; and it trains."""
    with pytest.raises(ConfigError, match="'optim.lr' must be set with optim.name=sgd"):
        load_config(TrainConfig, None, ["optim.name=sgd"])
    cfg = TrainConfig(
        device="cpu",
        log_every=5,
        optim=load_config(
            TrainConfig,
            None,
            ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.warmup_steps=5", "optim.total_steps=500"],
        ).optim,
        data=FAST.data,
    )
    torch.manual_seed(0)
    utts = load_utterances(pairs(small_partition, small_labels, "train"), SMALL_K, cfg.data, MFCC_RATE)
    model = build_hubert(TINY, SMALL_K)
    optimizer = make_optimizer(model, cfg.optim)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    _, history = forty_steps(model, batch_loader(utts, MFCC_RATE, cfg.data, seed=0), cfg, optimizer, global_step=0)
    assert history[-1] < history[0] - 0.3, history


@pytest.mark.slow
def test_train_local_end_to_end_and_export_loads_in_s3prl(small_partition, small_labels, tmp_path):
    out = tmp_path / "central"
    args = [
        "train-local",
        "--out",
        out,
        "--preset",
        "tiny",
        "--steps",
        "30",
        "num_classes=20",
        f"train_manifests={[str(p) for p, _ in pairs(small_partition, small_labels, 'train')]}",
        f"train_labels={[str(p) for _, p in pairs(small_partition, small_labels, 'train')]}",
        "--valid-manifest",
        small_partition / "client_0" / "valid.tsv",
        "--valid-labels",
        small_labels / "client_0" / "valid.km",
        "eval_every=15",
        "checkpoint_every=15",
        "train.log_every=5",
        "train.device=cpu",
        "train.optim.lr=2e-3",
        "train.optim.warmup_steps=5",
        "train.optim.total_steps=500",
        "train.data.min_seconds=1",
        "train.data.max_seconds=4",
        "train.data.batch_seconds=24",
    ]
    assert run_cli(*args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in rows if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [0, 15, 30] and valid[-1]["loss"] < valid[0]["loss"]
    assert (out / "checkpoints" / "step_15.pt").is_file() and (out / "training.png").is_file()
    payload = load_checkpoint(out / "checkpoints" / "final.pt", kind="hubert")
    assert payload["num_classes"] == 20 and payload["state"]["global_step"] == 30
    assert model_config_of(payload) == TINY

    exported = tmp_path / "hubert_tiny.pt"
    assert (
        run_cli(
            "export", "--checkpoint", out / "checkpoints" / "final.pt", "--format", "s3prl-hubert", "--out", exported
        )
        == 0
    )
    record = json.loads(exported.with_name("hubert_tiny.pt.json").read_text())
    assert record["num_classes"] == 20 and record["format"] == "s3prl-hubert"
    assert (
        run_cli(
            "export", "--checkpoint", out / "checkpoints" / "final.pt", "--format", "s3prl-hubert", "--out", exported
        )
        == 2
    ), "no silent overwrite"
    manifest = read_manifest(small_partition / "client_0" / "valid.tsv")
    wavs = [torch.from_numpy(sf.read(manifest.audio_path(i), dtype="float32")[0]) for i in range(2)]
    assert_s3prl_matches(exported, payload, wavs)


def assert_s3prl_matches(exported: Path, payload: dict, wavs: list[torch.Tensor]) -> None:
    import s3prl.hub as hub

    from fedhubert.model.hubert import hidden_states

    cfg = model_config_of(payload)
    model = build_hubert(cfg, payload["num_classes"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    upstream = hub.hubert_local(ckpt=str(exported)).eval()
    with torch.no_grad():
        for wav in wavs:
            theirs = upstream([wav])["hidden_states"]
            ours = hidden_states(model, wav[None], None, cfg.normalize_waveform)
            assert len(theirs) == len(ours) == cfg.layers + 1
            for a, b in zip(ours, theirs, strict=True):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_base_sized_export_matches_s3prl_on_real_audio(small_partition, tmp_path):
    from fedhubert.model.checkpoint import save_checkpoint

    torch.manual_seed(3)
    cfg = load_config(ModelConfig)  # base
    model = build_hubert(cfg, 100)
    save_checkpoint(tmp_path / "base.pt", kind="hubert", model=cfg, num_classes=100, state_dict=model.state_dict())
    assert (
        run_cli(
            "export",
            "--checkpoint",
            tmp_path / "base.pt",
            "--format",
            "s3prl-hubert",
            "--out",
            tmp_path / "base_s3prl.pt",
        )
        == 0
    )
    manifest = read_manifest(small_partition / "client_1" / "train.tsv")
    wav = torch.from_numpy(sf.read(manifest.audio_path(0), dtype="float32")[0])
    assert_s3prl_matches(tmp_path / "base_s3prl.pt", load_checkpoint(tmp_path / "base.pt"), [wav])


def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path):
    from fedhubert.model.checkpoint import save_checkpoint

    path = tmp_path / "a.pt"
    save_checkpoint(path, kind="hubert", model=TINY, num_classes=10, state_dict=build_hubert(TINY, 10).state_dict())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a fedhubert checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    save_checkpoint(tmp_path / "b.pt", kind="distiller", model=TINY, num_classes=10, state_dict={})
    with pytest.raises(CheckpointError, match="holds a 'distiller' model"):
        load_checkpoint(tmp_path / "b.pt", kind="hubert")
