"""`fedhubert probe`: the probe itself on features whose answer is known, speaker-disjoint folds, frozen features
of real checkpoints, and the command on the synthetic Speech Commands with a tiny trained HuBERT and a student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common import run_cli
from fedhubert.audio import audio_info
from fedhubert.distill.config import DistillLossConfig, StudentConfig
from fedhubert.distill.models import build_student, distiller_config, load_teacher
from fedhubert.eval.frozen_features import frozen_model, length_batches, pooled_features, read_payload
from fedhubert.eval.keyword_clips import ProbeError, list_clips
from fedhubert.eval.probe import fold_accuracies, speaker_folds
from fedhubert.eval.speech_commands_format import NOISE_DIR, TRAIN_DIR
from fedhubert.model.checkpoint import save_checkpoint
from fedhubert.model.student import init_from_teacher

MODEL_FIELDS = {
    "name",
    "kind",
    "architecture",
    "checkpoint",
    "checkpoint_sha256",
    "random_init",
    "layer",
    "feature_dim",
    "accuracy_mean",
    "accuracy_sd",
    "fold_accuracies",
    "converged",
    "clips",
    "speakers",
    "words",
    "chance",
    "seconds",
    "features_seconds",
    "fit_seconds",
}


def synthetic(num_speakers: int = 12, words: int = 6, repetitions: int = 3, seed: int = 0):
    """Labels and speakers of a balanced keyword set: every speaker says every word `repetitions` times."""
    labels = np.tile(np.repeat(np.arange(words), repetitions), num_speakers)
    speakers = np.repeat(np.array([f"s{i:02d}" for i in range(num_speakers)], dtype=object), words * repetitions)
    return labels, speakers, np.random.default_rng(seed)


def test_a_linearly_encoded_word_is_found_and_pure_noise_is_not():
    labels, speakers, rng = synthetic()
    folds = speaker_folds(labels, speakers, 5, seed=0)
    chance = 1 / 6
    encoded = np.eye(6)[labels] @ rng.normal(size=(6, 40)) + 0.5 * rng.normal(size=(len(labels), 40))
    accuracies, converged = fold_accuracies(encoded, labels, folds)
    assert converged and len(accuracies) == 5 and min(accuracies) >= 0.95
    noise_means = [
        np.mean(fold_accuracies(np.random.default_rng(s).normal(size=(len(labels), 40)), labels, folds)[0])
        for s in range(3)
    ]
    assert abs(np.mean(noise_means) - chance) < 0.08, noise_means


def test_speaker_specific_codes_score_chance_because_folds_keep_speakers_apart():
    """Each (speaker, word) has its own random code: memorising speakers answers within a speaker only. Clip-level
    folds would be fooled (a check that this test can fail); speaker-disjoint folds are not."""
    from sklearn.model_selection import StratifiedKFold

    labels, speakers, rng = synthetic()
    codes = {(s, w): rng.normal(size=100) for s in sorted(set(speakers)) for w in range(6)}
    features = np.stack([codes[s, w] for s, w in zip(speakers, labels, strict=True)]) + 0.1 * rng.normal(
        size=(len(labels), 100)
    )
    leaky = list(StratifiedKFold(5, shuffle=True, random_state=0).split(features, labels))
    assert np.mean(fold_accuracies(features, labels, leaky)[0]) > 0.9
    assert np.mean(fold_accuracies(features, labels, speaker_folds(labels, speakers, 5, seed=0))[0]) < 0.4


def test_folds_are_speaker_disjoint_and_test_every_clip_once(tiny_speech_commands):
    clips = list_clips(tiny_speech_commands, words=[], folds=5)
    folds = speaker_folds(clips.labels, clips.speakers, 5, seed=0)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(len(clips)))
    for train, test in folds:
        assert not set(clips.speakers[train]) & set(clips.speakers[test])
        assert len(train) + len(test) == len(clips)
    assert [t.tolist() for _, t in folds] == [t.tolist() for _, t in speaker_folds(clips.labels, clips.speakers, 5, 0)]


def test_clips_words_and_speakers_come_from_the_layout(tiny_speech_commands):
    folder = tiny_speech_commands / TRAIN_DIR
    clips = list_clips(tiny_speech_commands, words=[], folds=5)
    words = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != NOISE_DIR)
    assert clips.words == words and NOISE_DIR not in clips.words
    assert sorted(clips.paths) == sorted(p for w in words for p in (folder / w).glob("*.wav"))
    for path, label, speaker in zip(clips.paths, clips.labels, clips.speakers, strict=True):
        assert path.parent.name == clips.words[label] and path.name.startswith(f"{speaker}_nohash_")
    assert clips.num_speakers == 10
    assert clips.chance == pytest.approx(max(np.bincount(clips.labels)) / len(clips))
    subset = list_clips(tiny_speech_commands, words=["yes", "no"], folds=5, max_speakers=6, seed=1)
    assert subset.words == ["no", "yes"] and subset.num_speakers == 6
    assert (
        subset.num_speakers
        == list_clips(tiny_speech_commands, words=["yes", "no"], folds=5, max_speakers=6, seed=1).num_speakers
    )


@pytest.fixture(scope="module")
def student_checkpoint(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer DistilHuBERT student started from the tiny teacher, saved as `fedhubert distill` saves it."""
    teacher, cfg, _ = load_teacher(tiny_teacher)
    config = distiller_config(StudentConfig(layers=1), cfg, [1, 2], 1.0)
    torch.manual_seed(3)
    student = build_student(config, DistillLossConfig())
    init_from_teacher(student, teacher.state_dict())
    path = tmp_path_factory.mktemp("student") / "checkpoints" / "final.pt"
    path.parent.mkdir()
    save_checkpoint(path, kind="distiller", model={"distiller": config}, num_classes=0, state_dict=student.state_dict())
    return path


def test_batches_give_each_clip_the_features_it_has_alone(tiny_speech_commands, tiny_teacher, student_checkpoint):
    clips = list_clips(tiny_speech_commands, words=["yes", "no"], folds=5)
    paths = clips.paths[:6]
    lengths = [16000, 16000, 12000, 16000, 12000, 16000]  # two lengths: two batch shapes
    assert length_batches(lengths, 3) == [[2, 4], [0, 1, 3], [5]]
    real = [audio_info(path).num_samples for path in paths]
    for checkpoint in (tiny_teacher, student_checkpoint):
        model = frozen_model(checkpoint, read_payload(checkpoint), random_init=False, name="m")
        assert model.min_samples() == 400, "the wav2vec 2.0 CNN's receptive field: one frame from 400 samples"
        together = pooled_features(model, paths, real, layer=None, batch_size=4, device=torch.device("cpu"))
        alone = pooled_features(model, paths, real, layer=None, batch_size=1, device=torch.device("cpu"))
        np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
        width = together.shape[1] // (model.num_layers + 1)
        layer_1 = pooled_features(model, paths, real, layer=1, batch_size=4, device=torch.device("cpu"))
        np.testing.assert_allclose(layer_1, together[:, width : 2 * width], rtol=1e-4, atol=1e-5)
        assert not model.module.training and not any(p.requires_grad for p in model.module.parameters())


def test_random_init_is_the_same_architecture_with_seeded_fresh_weights(tiny_teacher, student_checkpoint):
    for checkpoint in (tiny_teacher, student_checkpoint):
        payload = read_payload(checkpoint)
        trained = frozen_model(checkpoint, payload, random_init=False, name="t").module.state_dict()
        fresh = frozen_model(checkpoint, payload, random_init=True, name="r").module.state_dict()
        again = frozen_model(checkpoint, payload, random_init=True, name="r").module.state_dict()
        assert trained.keys() == fresh.keys()
        assert all(torch.equal(fresh[k], again[k]) for k in fresh), "seed 0: the same fresh weights every time"
        changed = [k for k in trained if not torch.equal(trained[k], fresh[k])]
        assert len(changed) > 0.5 * len(trained)


def test_probe_command_scores_trained_and_random_init_models(
    tiny_speech_commands, tiny_teacher, student_checkpoint, tmp_path, caplog
):
    out = tmp_path / "probe"
    assert (
        run_cli(
            "probe",
            "--dataset",
            tiny_speech_commands,
            "--checkpoint",
            tiny_teacher,
            "--checkpoint",
            student_checkpoint,
            "--random-init",
            "--out",
            out,
            "--threads",
            "2",
        )
        == 0
    )
    result = json.loads((out / "probe.json").read_text())
    clips = list_clips(tiny_speech_commands, words=[], folds=5)
    assert result["data"] == {
        "root": str(clips.root),
        "clips": len(clips),
        "words": len(clips.words),
        "word_names": clips.words,
        "speakers": 10,
        "chance": clips.chance,
    }
    models = result["models"]
    assert [(m["kind"], m["random_init"]) for m in models] == [
        ("hubert", False),
        ("distiller", False),
        ("hubert", True),
        ("distiller", True),
    ]
    assert [m["checkpoint"] for m in models] == [str(tiny_teacher), str(student_checkpoint)] * 2
    assert len({m["name"] for m in models}) == 4
    for m in models:
        assert set(m) == MODEL_FIELDS
        assert len(m["fold_accuracies"]) == 5 and all(0 <= a <= 1 for a in m["fold_accuracies"])
        assert m["accuracy_mean"] == pytest.approx(np.mean(m["fold_accuracies"]))
        assert m["accuracy_sd"] == pytest.approx(np.std(m["fold_accuracies"], ddof=1))
        assert (m["clips"], m["speakers"], m["words"], m["chance"], m["layer"]) == (
            len(clips),
            10,
            len(clips.words),
            clips.chance,
            "all",
        )
        assert m["seconds"] >= m["features_seconds"] > 0
    assert [m["feature_dim"] for m in models] == [3 * 64, 2 * 64, 3 * 64, 2 * 64]
    table = (out / "probe.md").read_text()
    for m in models:
        assert f"| {m['name']} |" in table and f"{100 * m['accuracy_mean']:.1f}%" in table
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["config"]["checkpoints"] == [str(tiny_teacher), str(student_checkpoint)]
    assert set(run["summary"]["models"]) == {m["name"] for m in models}
    log_text = (out / "logs" / "probe.log").read_text()
    assert log_text.count("probe accuracy") == 4 and "speaker-disjoint folds" in log_text


def test_one_layer_can_be_probed_and_a_missing_layer_is_named(tiny_speech_commands, tiny_teacher, tmp_path, capsys):
    args = ["probe", "--dataset", tiny_speech_commands, "--checkpoint", tiny_teacher]
    assert run_cli(*args, "--layer", "1", "--out", tmp_path / "one", 'words=["yes","no",up]') == 0
    (model,) = json.loads((tmp_path / "one" / "probe.json").read_text())["models"]
    assert (model["layer"], model["feature_dim"], model["words"]) == (1, 64, 3)
    assert run_cli(*args, "--layer", "3", "--out", tmp_path / "three") == 2
    assert f"layer=3, but {tiny_teacher} has 2 transformer layers" in capsys.readouterr().err


def test_threads_are_set_for_the_run_and_restored(tiny_speech_commands, tiny_teacher, tmp_path, monkeypatch):
    import fedhubert.eval.frozen_features as features

    seen, real = [], features.pooled_features

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "pooled_features", spy)
    before = torch.get_num_threads()
    assert (
        run_cli(
            "probe",
            "--dataset",
            tiny_speech_commands,
            "--checkpoint",
            tiny_teacher,
            "--threads",
            "1",
            "--out",
            tmp_path / "p",
            'words=["yes","no"]',
        )
        == 0
    )
    assert seen == [1] and torch.get_num_threads() == before


@pytest.fixture
def four_speakers(tiny_speech_commands, tmp_path) -> Path:
    root = tmp_path / "few"
    source = tiny_speech_commands / TRAIN_DIR
    keep = sorted({p.name.split("_nohash_")[0] for p in source.glob("yes/*.wav")})[:4]
    for path in source.glob("*/*.wav"):
        if path.parent.name != NOISE_DIR and path.name.split("_nohash_")[0] in keep:
            (root / TRAIN_DIR / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, root / TRAIN_DIR / path.parent.name / path.name)
    return root


def test_a_missing_dataset_or_too_few_speakers_stops_with_the_fix(four_speakers, tiny_teacher, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert run_cli("probe", "--dataset", missing, "--checkpoint", tiny_teacher, "--out", tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert f"{missing / TRAIN_DIR} does not exist" in err and "fedhubert synth speech-commands" in err
    assert run_cli("probe", "--dataset", four_speakers, "--checkpoint", tiny_teacher, "--out", tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert f"{four_speakers / TRAIN_DIR} holds clips of 4 speaker(s)" in err and "needs at least 5" in err
    assert "--speakers 10" in err and "lower folds=N" in err
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "failed"
    with pytest.raises(ProbeError, match="has no word folders \\['bird'\\]"):
        list_clips(four_speakers, words=["bird"], folds=2)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "key 'checkpoints' is empty: pass --checkpoint CKPT"),
        (["--checkpoint", "a.pt", "--checkpoint", "a.pt"], "lists a checkpoint twice"),
        (["--checkpoint", "a.pt", "max_speakers=3"], "max_speakers (3) is below folds (5)"),
        (["--checkpoint", "a.pt", "folds=1"], "key 'folds' must be >= 2"),
    ],
)
def test_config_mistakes_are_named_before_anything_is_written(tiny_speech_commands, tmp_path, capsys, args, message):
    assert run_cli("probe", "--dataset", tiny_speech_commands, "--out", tmp_path / "p", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_a_checkpoint_that_is_not_a_model_is_refused(tiny_speech_commands, tmp_path, capsys):
    other = tmp_path / "codebook.pt"
    save_checkpoint(other, kind="kmeans", model={}, num_classes=0, state_dict={})
    args = ["probe", "--dataset", tiny_speech_commands, "--out"]
    assert run_cli(*args, tmp_path / "a", "--checkpoint", other) == 2
    assert f"{other} holds a 'kmeans' model; the probe takes a HuBERT" in capsys.readouterr().err
    assert run_cli(*args, tmp_path / "b", "--checkpoint", tmp_path / "none.pt") == 2
    assert f"checkpoint {tmp_path / 'none.pt'} does not exist" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_asking_for_a_missing_gpu_stops_before_any_model_runs(tiny_speech_commands, tiny_teacher, tmp_path, capsys):
    assert (
        run_cli(
            "probe",
            "--dataset",
            tiny_speech_commands,
            "--checkpoint",
            tiny_teacher,
            "--out",
            tmp_path / "p",
            "device=cuda",
        )
        == 2
    )
    assert "torch sees no CUDA GPU here; use device=cpu or auto" in capsys.readouterr().err
    assert not (tmp_path / "p" / "probe.json").exists()


def test_unusable_clips_are_all_named_before_any_model_runs(tiny_speech_commands, tiny_teacher, tmp_path, capsys):
    import soundfile as sf

    root = tmp_path / "sc"
    shutil.copytree(tiny_speech_commands / TRAIN_DIR, root / TRAIN_DIR)
    corrupt, slow = sorted((root / TRAIN_DIR / "yes").glob("*.wav"))[:2]
    corrupt.write_bytes(b"not a wav file")
    sf.write(slow, np.zeros(8000, dtype=np.float32), 8000)
    assert run_cli("probe", "--dataset", root, "--checkpoint", tiny_teacher, "--out", tmp_path / "p") == 2
    err = capsys.readouterr().err
    assert f"2 of {len(list_clips(tiny_speech_commands, words=[], folds=5))} clips in {root / TRAIN_DIR} cannot " in err
    assert f"cannot read the header of {corrupt}" in err and f"{slow}: sample rate 8000 Hz" in err
    assert not (tmp_path / "p" / "probe.json").exists()
