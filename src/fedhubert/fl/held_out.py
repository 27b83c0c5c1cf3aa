"""The server's held-out evaluation: a bounded, seeded, speaker-stratified sample of the partition's `eval_subset`,
the same at every evaluation of a run (round 0 included, and after a resume), evaluated with progress lines.

LibriSpeech's dev-clean is 5.4 h; evaluated whole at HuBERT Base it took 690-840 s a round on 2 cores, six times the
training of a round of 16 clients (issue 42). `eval_seconds` bounds the audio instead: utterances are drawn one
speaker at a time in a seeded order (each speaker's own utterances shuffled with the same seed), so that even a
small budget covers as many speakers as it can, and the sample is what every evaluation sees. Its makeup (speakers,
utterances, seconds, seed) goes into run.json; each eval row of metrics.jsonl records its wall time and the audio
it covered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedhubert.audio import SAMPLE_RATE
from fedhubert.runlog import clock
from fedhubert.train.config import TrainConfig
from fedhubert.train.data import Batch, Utterance
from fedhubert.train.loop import Objective, evaluate

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 30.0  # a progress line at most this often while an evaluation runs


def speaker_of(path: Path) -> str:
    """The speaker of a LibriSpeech-named utterance (`<speaker>-<chapter>-<utterance>.flac`), else its folder's
    speaker folder (`<speaker>/<chapter>/file`)."""
    head = path.name.split("-", 1)[0]
    return head if "-" in path.name else path.parent.parent.name


def stratified_sample(utterances: Sequence[Utterance], seconds: float | None, seed: int) -> list[Utterance]:
    """At most `seconds` of audio (at least one utterance; None: all), drawn round-robin over the speakers in a
    seeded order, each speaker's utterances in a seeded order, up to the first that would go over the budget;
    returned in the manifest's order."""
    if seconds is None:
        return list(utterances)
    rng = np.random.default_rng(seed)
    by_speaker: dict[str, list[int]] = {}
    for index, utt in enumerate(utterances):
        by_speaker.setdefault(speaker_of(utt.path), []).append(index)
    queues = [list(rng.permutation(by_speaker[s])) for s in sorted(by_speaker)]
    queues = [queues[i] for i in rng.permutation(len(queues))]
    chosen, total, budget = [], 0, int(seconds * SAMPLE_RATE)
    while any(queues):
        for queue in queues:
            if not queue:
                continue
            index = int(queue.pop(0))
            if chosen and total + utterances[index].num_samples > budget:
                queues = []
                break
            chosen.append(index)
            total += utterances[index].num_samples
    return [utterances[i] for i in sorted(chosen)]


def describe(
    sample: Sequence[Utterance], whole: Sequence[Utterance], subset: str, seconds: float | None, seed: int
) -> dict:
    """What run.json records of the held-out sample."""
    return {
        "subset": subset,
        "budget_seconds": seconds,
        "seed": seed,
        "utterances": len(sample),
        "seconds": round(sum(u.num_samples for u in sample) / SAMPLE_RATE, 1),
        "speakers": len({speaker_of(u.path) for u in sample}),
        "of_utterances": len(whole),
        "of_seconds": round(sum(u.num_samples for u in whole) / SAMPLE_RATE, 1),
        "of_speakers": len({speaker_of(u.path) for u in whole}),
    }


def with_progress(batches: Iterable[Batch], total: int, label: str) -> Iterator[Batch]:
    """The batches, with a log line (done, elapsed, ETA) at most every PROGRESS_EVERY_S seconds."""
    started = last = time.monotonic()
    for done, batch in enumerate(batches, start=1):
        yield batch
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S and done < total:
            last = now
            eta = (now - started) / done * (total - done)
            log.info(
                "%s: batch %d of %d, %s elapsed, about %s left", label, done, total, clock(now - started), clock(eta)
            )


@dataclass
class HeldOutEvaluation:
    """Evaluates a global state on the held-out sample with `model` (loaded in place, on `device`)."""

    model: torch.nn.Module
    loader: torch.utils.data.DataLoader
    train: TrainConfig
    objective: Objective
    device: torch.device
    seed: int
    sample: dict

    def __call__(self, state: dict[str, torch.Tensor], label: str = "server evaluation") -> dict:
        started = time.monotonic()
        self.model.load_state_dict(state)
        covered = 0.0

        def counted(batches: Iterable[Batch]) -> Iterator[Batch]:
            nonlocal covered
            for batch in batches:
                covered += batch.seconds
                yield batch

        self.loader.batch_sampler.set_epoch(0)  # the same crops every evaluation (`evaluate` sees only the batches)
        batches = counted(with_progress(self.loader, len(self.loader), label))
        result = evaluate(self.model, batches, self.train, objective=self.objective, device=self.device, seed=self.seed)
        return {**result, "eval_s": round(time.monotonic() - started, 2), "eval_audio_s": round(covered, 1)}
