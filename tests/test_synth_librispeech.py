"""The synthetic LibriSpeech: layout, audio, speakers, transcripts, determinism, and S3PRL's own reader."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from common import TINY_LIBRISPEECH, run_cli
from fedhubert.config import load_config
from fedhubert.corpus.librispeech_synth import LibriSpeechSynthConfig, allocate

SUBSETS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "test-clean")


def speakers_table(root: Path) -> dict[int, dict]:
    rows = {}
    for line in (root / "SPEAKERS.TXT").read_text().splitlines():
        if line.startswith(";"):
            continue
        spk, sex, subset, minutes, name = [part.strip() for part in line.split("|", 4)]
        rows[int(spk)] = {"sex": sex, "subset": subset, "minutes": float(minutes), "name": name}
    return rows


def transcripts(root: Path) -> dict[str, str]:
    out = {}
    for trans in root.glob("*/*/*/*.trans.txt"):
        for line in trans.read_text().splitlines():
            utt, text = line.split(" ", 1)
            assert utt not in out
            out[utt] = text
    return out


def tree_digest(root: Path) -> dict[str, str]:
    skip = {"run.json", "config.yaml"}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip and "logs" not in p.relative_to(root).parts
    }


def test_layout_speakers_and_transcripts_agree(tiny_librispeech):
    root = tiny_librispeech
    table = speakers_table(root)
    cfg = load_config(LibriSpeechSynthConfig, root / "config.yaml")
    assert len(table) == cfg.speakers == 7
    assert Counter(r["subset"] for r in table.values()) == Counter(allocate(7, cfg.subsets))
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "logs") == sorted(SUBSETS)
    for spk, row in table.items():
        folders = list(root.glob(f"*/{spk}"))
        assert [f.parent.name for f in folders] == [row["subset"]], "a speaker lives in exactly one subset"
        chapters = sorted(p.name for p in folders[0].iterdir())
        assert len(chapters) == cfg.chapters
        for chapter in chapters:
            assert (folders[0] / chapter / f"{spk}-{chapter}.trans.txt").is_file()
    flacs = {p.stem: p for p in root.glob("*/*/*/*.flac")}
    texts = transcripts(root)
    assert set(flacs) == set(texts), "every file has exactly one transcript line and vice versa"
    for utt, path in flacs.items():
        spk, chapter, _ = utt.split("-")
        assert path.parent.name == chapter and path.parent.parent.name == spk
        assert re.fullmatch(r"\d+-\d+-\d{4}", utt)
    assert all(re.fullmatch(r"[A-Z']+( [A-Z']+)*", text) for text in texts.values())


def test_audio_is_16k_mono_flac_within_the_length_bounds(tiny_librispeech):
    cfg = load_config(LibriSpeechSynthConfig, tiny_librispeech / "config.yaml")
    seconds_per_speaker: Counter = Counter()
    for path in tiny_librispeech.glob("*/*/*/*.flac"):
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
        assert cfg.min_seconds <= info.duration <= cfg.max_seconds
        wav, _ = sf.read(path)
        assert np.sqrt(np.mean(wav**2)) > 0.01, f"{path} is silent"
        seconds_per_speaker[int(path.stem.split("-")[0])] += info.duration
    table = speakers_table(tiny_librispeech)
    for spk, seconds in seconds_per_speaker.items():
        assert seconds >= cfg.minutes * 60
        assert table[spk]["minutes"] == pytest.approx(seconds / 60, abs=0.006)


def test_speakers_are_distinct_consistent_and_of_both_sexes(tiny_librispeech):
    voices = json.loads((tiny_librispeech / "voices.json").read_text())
    table = speakers_table(tiny_librispeech)
    assert set(map(int, voices)) == set(table)
    signatures = {
        (v["voice"]["language"], v["voice"]["variant"], v["voice"]["pitch"], v["voice"]["rate"])
        for v in voices.values()
    }
    assert len(signatures) == len(voices), "no two speakers share a voice"
    assert {row["sex"] for row in table.values()} == {"F", "M"}
    for spk, row in table.items():
        assert voices[str(spk)]["sex"] == row["sex"]
        female_variant = voices[str(spk)]["voice"]["variant"] in {
            "f1",
            "f2",
            "f3",
            "f4",
            "f5",
            "Alicia",
            "Andrea",
            "Annie",
            "belinda",
            "linda",
            "steph",
            "anika",
        }
        assert female_variant == (row["sex"] == "F")


def noise_floor_db(path: Path) -> float:
    """Quietest frames relative to the loudest: higher means noisier."""
    wav, rate = sf.read(path)
    frames = wav[: len(wav) // 400 * 400].reshape(-1, 400)
    energy = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    return float(np.percentile(energy, 10) - np.percentile(energy, 95))


def test_other_subsets_are_noisier_than_clean_ones(tiny_librispeech):
    floors = {
        s: np.mean([noise_floor_db(p) for p in tiny_librispeech.glob(f"{s}/*/*/*.flac")])
        for s in ("train-clean-100", "train-clean-360", "train-other-500")
    }
    assert floors["train-other-500"] > max(floors["train-clean-100"], floors["train-clean-360"]) + 6


def test_s3prl_librispeech_reader_reads_the_corpus(tiny_librispeech):
    from s3prl.dataio.corpus.librispeech import LibriSpeech

    corpus = LibriSpeech(
        str(tiny_librispeech),
        n_jobs=1,
        train_split=["train-clean-100", "train-clean-360", "train-other-500"],
        valid_split=["dev-clean"],
        test_split=["test-clean"],
    )
    train, valid, test = corpus.data_split_ids
    texts = transcripts(tiny_librispeech)
    table = speakers_table(tiny_librispeech)
    assert len(train) + len(valid) + len(test) == len(texts)
    for utt, item in corpus.all_data.items():
        assert item["transcription"] == texts[utt]
        assert item["gender"] == table[item["speaker"]]["sex"]
        assert item["corpus_split"] == table[item["speaker"]]["subset"]


@pytest.mark.slow
def test_same_seed_gives_identical_files_whatever_the_worker_count(tiny_librispeech, tmp_path):
    again = tmp_path / "again"
    assert run_cli("synth", "librispeech", "--out", again, "--workers", "1", *TINY_LIBRISPEECH) == 0
    assert tree_digest(again) == tree_digest(tiny_librispeech)
    other = tmp_path / "other-seed"
    args = [a if a != "11" else "12" for a in TINY_LIBRISPEECH]
    assert run_cli("synth", "librispeech", "--out", other, *args, "minutes=0.1") == 0
    assert speakers_table(other).keys() != speakers_table(tiny_librispeech).keys()


def test_outputs_record_how_they_were_made(tiny_librispeech):
    run = json.loads((tiny_librispeech / "run.json").read_text())
    assert run["status"] == "completed" and run["stage"] == "synth-librispeech"
    assert run["summary"]["speakers"] == 7 and run["summary"]["utterances"] == len(transcripts(tiny_librispeech))
    assert run["packages"]["torch"] == "2.8.0"
    resolved = yaml.safe_load((tiny_librispeech / "config.yaml").read_text())
    assert resolved["seed"] == 11 and resolved["chapters"] == 2 and resolved["max_seconds"] == 8.0
    assert (tiny_librispeech / "logs" / "synth-librispeech.log").read_text().count("synthesising 7 speakers") == 1
