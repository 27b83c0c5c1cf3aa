"""The synthetic Speech Commands v0.01: layout, clips, the hash split, determinism, and S3PRL's own datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from common import TINY_SPEECH_COMMANDS, run_cli
from fedhubert.eval.speech_commands_format import KEYWORDS, split_of
from test_synth_librispeech import tree_digest

AUX = ["bed", "cat", "marvin", "wow"]


def test_layout_has_every_word_background_noise_and_the_test_set(tiny_speech_commands):
    train = tiny_speech_commands / "speech_commands_v0.01"
    test = tiny_speech_commands / "speech_commands_test_set_v0.01"
    words = sorted(p.name for p in train.iterdir() if p.is_dir() and p.name != "_background_noise_")
    assert words == sorted([*KEYWORDS, *AUX])
    noise = sorted((train / "_background_noise_").glob("*.wav"))
    assert len(noise) >= 3 and all(sf.info(p).duration == pytest.approx(4.0) for p in noise)
    assert sorted(p.name for p in test.iterdir()) == sorted([*KEYWORDS, "_silence_", "_unknown_"])
    counts = {p.name: len(list(p.glob("*.wav"))) for p in test.iterdir()}
    assert set(counts.values()) == {3}, "the test set is balanced: one clip per class per test speaker"
    for keyword in KEYWORDS:
        assert list((train / keyword).glob("*_nohash_0.wav")), f"nobody said {keyword}"


def test_clips_are_one_second_16k_mono_pcm16(tiny_speech_commands):
    clips = list(tiny_speech_commands.glob("speech_commands*/*/*_nohash_*.wav"))
    assert len(clips) > 100
    for path in clips:
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 16000, "PCM_16")
        if path.parent.name != "_silence_":
            wav, _ = sf.read(path)
            assert np.abs(wav).max() > 0.05, f"{path} holds no speech"


def test_speakers_of_the_test_set_are_not_in_the_training_folder(tiny_speech_commands):
    def speakers(folder: Path) -> set[str]:
        return {p.name.split("_nohash_")[0] for p in folder.glob("*/*_nohash_*.wav")}

    train = speakers(tiny_speech_commands / "speech_commands_v0.01")
    test = speakers(tiny_speech_commands / "speech_commands_test_set_v0.01")
    assert len(train) == 10 and len(test) == 3 and not train & test


def test_list_files_follow_the_hash_split_that_s3prl_applies(tiny_speech_commands):
    from s3prl.downstream.speech_commands.expert import split_dataset

    root = tiny_speech_commands / "speech_commands_v0.01"
    train, valid = split_dataset(root)
    assert train and valid, "S3PRL must find both a training and a dev split"
    listed = (root / "validation_list.txt").read_text().split()
    assert sorted(listed) == sorted(f"{Path(p).parent.name}/{Path(p).name}" for _, p in valid)
    testing = (root / "testing_list.txt").read_text().split()
    assert testing and all(split_of(Path(p).name) == "testing" for p in testing)
    every = {f"{p.parent.name}/{p.name}" for p in root.glob("*/*_nohash_*.wav")}
    assert len(every) == len(train) + len(valid) + len(testing)


def test_s3prl_datasets_load_clips_through_sox(tiny_speech_commands):
    from s3prl.downstream.speech_commands.dataset import CLASSES, SpeechCommandsDataset, SpeechCommandsTestingDataset
    from s3prl.downstream.speech_commands.expert import split_dataset

    root = tiny_speech_commands / "speech_commands_v0.01"
    train, _ = split_dataset(root)
    dataset = SpeechCommandsDataset(train, speech_commands_root=str(root))
    labels = {CLASSES[label] for _, label in ((None, dataset.class2index[c]) for c, _ in dataset.data)}
    assert labels == set(CLASSES), "all 12 classes, _silence_ from the background noise"
    for index in (0, len(dataset) - 1):
        wav, label, _ = dataset[index]
        assert wav.shape == (16000,) and 0 <= label < 12
    test = SpeechCommandsTestingDataset(
        speech_commands_test_root=str(tiny_speech_commands / "speech_commands_test_set_v0.01")
    )
    assert len(test) == 12 * 3
    wav, label, _ = test[0]
    assert wav.shape == (16000,)


@pytest.mark.slow
def test_same_seed_gives_identical_files(tiny_speech_commands, tmp_path):
    again = tmp_path / "again"
    assert run_cli("synth", "speech-commands", "--out", again, "--workers", "1", *TINY_SPEECH_COMMANDS) == 0
    assert tree_digest(again) == tree_digest(tiny_speech_commands)
    voices = json.loads((again / "voices.json").read_text())
    assert sum(v["test_set"] for v in voices.values()) == 3


def test_repetitions_flag_sets_both_ends_of_keyword_repetitions(tmp_path, capsys):
    out = tmp_path / "sc"
    assert run_cli("synth", "speech-commands", "--out", out, "--repetitions", "4", "--print-config") == 0
    assert yaml.safe_load(capsys.readouterr().out)["keyword_repetitions"] == [4, 4]
    assert not out.exists(), "--print-config synthesizes nothing"
    assert run_cli("synth", "speech-commands", "--out", out, "--repetitions", "6", "--print-config") == 2
    assert "key 'keyword_repetitions[0]' must be <= 5, got 6" in capsys.readouterr().err
