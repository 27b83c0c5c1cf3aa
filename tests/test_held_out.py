"""The server's held-out sample: bounded by eval_seconds, spread over the speakers, the same every time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedhubert.fl.held_out import describe, speaker_of, stratified_sample
from fedhubert.train.data import Utterance


def corpus(durations_by_speaker: dict[str, list[float]]) -> list[Utterance]:
    return [
        Utterance(Path(f"dev-clean/{spk}/7/{spk}-7-{i:04d}.flac"), int(seconds * 16000), None)
        for spk, durations in durations_by_speaker.items()
        for i, seconds in enumerate(durations)
    ]


def test_speaker_of_reads_librispeech_names_and_folders():
    assert speaker_of(Path("dev-clean/84/121123/84-121123-0001.flac")) == "84"
    assert speaker_of(Path("corpus/spk9/chapter/utt.wav")) == "spk9"


def test_the_sample_is_bounded_spread_over_speakers_and_the_same_every_time():
    utts = corpus({"1": [10.0] * 20, "2": [10.0] * 20, "3": [10.0] * 3, "4": [10.0] * 20})
    sample = stratified_sample(utts, 95.0, seed=3)
    seconds = sum(u.num_samples for u in sample) / 16000
    assert seconds <= 95.0 and len(sample) == 9
    speakers = [speaker_of(u.path) for u in sample]
    # round-robin: no speaker has two utterances more than another, the short speaker included
    counts = {s: speakers.count(s) for s in "1234"}
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert sample == stratified_sample(utts, 95.0, seed=3)  # the same at every evaluation
    assert sample != stratified_sample(utts, 95.0, seed=4)
    assert [utts.index(u) for u in sample] == sorted(utts.index(u) for u in sample)  # the manifest's order


def test_a_budget_past_the_set_takes_all_of_it_and_a_tiny_one_takes_one_utterance():
    utts = corpus({"1": [3.0, 4.0], "2": [5.0]})
    assert stratified_sample(utts, None, seed=0) == utts
    assert stratified_sample(utts, 1e6, seed=0) == utts
    assert len(stratified_sample(utts, 0.5, seed=0)) == 1
    record = describe(stratified_sample(utts, 8.0, seed=0), utts, "dev-clean", 8.0, 0)
    assert record["of_utterances"] == 3 and record["of_speakers"] == 2 and record["of_seconds"] == 12.0
    assert record["seconds"] <= 8.0 and record["speakers"] == 2


def test_a_short_speaker_runs_out_and_the_others_go_on():
    utts = corpus({"a": [1.0], "b": [1.0] * 10})
    sample = stratified_sample(utts, 6.0, seed=1)
    assert len(sample) == 6 and sum(speaker_of(u.path) == "a" for u in sample) == 1
    assert np.isclose(sum(u.num_samples for u in sample) / 16000, 6.0)


def test_a_long_evaluation_says_how_far_it_is_and_how_long_is_left(monkeypatch, caplog):
    import time

    from fedhubert.fl import held_out

    monkeypatch.setattr(held_out, "PROGRESS_EVERY_S", 0.05)
    caplog.set_level("INFO", logger="fedhubert.fl.held_out")

    def slow(n: int):
        for i in range(n):
            time.sleep(0.03)
            yield i

    assert list(held_out.with_progress(slow(6), 6, "round 3 server evaluation")) == list(range(6))
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(line.startswith("round 3 server evaluation: batch ") for line in lines), lines
    assert all(" of 6, " in line and "elapsed, about " in line and line.endswith(" left") for line in lines)
    assert not any("batch 6 of 6" in line for line in lines), "no progress line once it is done"
