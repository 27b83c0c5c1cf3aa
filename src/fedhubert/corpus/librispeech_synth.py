"""A small synthetic corpus in the LibriSpeech layout, spoken by espeak-ng speakers.

Layout (as on openslr.org/12): `SPEAKERS.TXT`, and per subset `<subset>/<speaker>/<chapter>/` holding
`<speaker>-<chapter>-<utt>.flac` (16 kHz mono) and `<speaker>-<chapter>.trans.txt`. Each speaker has one voice
(accent, sex-matched timbre, pitch, rate) and one recording channel; "other" subsets are noisier and reverberant.
Chapters read consecutive sentences of the bundled English text. `voices.json` records how each speaker was made.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedhubert.atomic import atomic_write_text
from fedhubert.audio import SAMPLE_RATE, write_audio
from fedhubert.config import param
from fedhubert.corpus.acoustics import apply_channel
from fedhubert.corpus.espeak import Voice, espeak_binary, speak
from fedhubert.corpus.librispeech import LIBRISPEECH_SUBSETS, SPEAKERS_FILE
from fedhubert.corpus.text import normalize_transcript, sentences
from fedhubert.corpus.voices import Channel, random_channel, random_name, random_voice
from fedhubert.errors import ConfigError
from fedhubert.parallel import parallel_map
from fedhubert.runlog import StageRun

log = logging.getLogger(__name__)

VOICES_FILE = "voices.json"
OUTPUTS = (SPEAKERS_FILE, VOICES_FILE, *LIBRISPEECH_SUBSETS)  # replaced as a whole by --force


@dataclass
class LibriSpeechSynthConfig:
    speakers: int = param(40, "speakers in all subsets together (each subset with a share gets at least one)", ge=1)
    minutes: float = param(2.0, "minutes of speech per speaker", gt=0, le=600)
    seed: int = param(0, "random seed; the same seed gives byte-identical files", ge=0)
    subsets: dict[str, float] = param(
        {"train-clean-100": 3.0, "train-clean-360": 3.0, "train-other-500": 2.0, "dev-clean": 1.0, "test-clean": 1.0},
        "relative share of the speakers in each LibriSpeech subset (0 leaves a subset out)",
        ge=0,
    )
    chapters: int = param(3, "chapters (passages of the text) per speaker", ge=1, le=50)
    min_seconds: float = param(1.0, "shortest utterance in seconds", gt=0.3)
    max_seconds: float = param(15.0, "longest utterance in seconds", le=35)
    clean_snr_db: list[float] = param([30.0, 45.0], "[low, high] signal-to-noise ratio of speakers in clean subsets")
    other_snr_db: list[float] = param([8.0, 18.0], "[low, high] signal-to-noise ratio of speakers in other subsets")
    other_reverb_s: list[float] = param(
        [0.15, 0.5], "[low, high] room reverberation time (RT60) in other subsets", ge=0
    )
    workers: int = param(0, "worker processes; 0 means one per CPU core", ge=0)

    def validate(self) -> None:
        unknown = sorted(set(self.subsets) - set(LIBRISPEECH_SUBSETS))
        if unknown:
            raise ConfigError(
                f"key 'subsets' names unknown subsets {unknown}; allowed: {', '.join(LIBRISPEECH_SUBSETS)}"
            )
        used = [s for s, share in self.subsets.items() if share > 0]
        if not used:
            raise ConfigError("key 'subsets' must give at least one subset a share above 0")
        if self.speakers < len(used):
            raise ConfigError(
                f"key 'speakers' must be at least {len(used)}, one per subset with a share; got {self.speakers}"
            )
        if self.min_seconds >= self.max_seconds:
            raise ConfigError(
                f"key 'min_seconds' ({self.min_seconds}) must be below 'max_seconds' ({self.max_seconds})"
            )
        for key in ("clean_snr_db", "other_snr_db", "other_reverb_s"):
            pair = getattr(self, key)
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ConfigError(f"key '{key}' must be [low, high] with low <= high, got {pair}")


@dataclass(frozen=True)
class SpeakerPlan:
    """Everything a worker needs to record one speaker; drawn up front so the output is independent of scheduling."""

    root: Path
    seed: int
    speaker_id: int
    subset: str
    sex: str
    name: str
    voice: Voice
    channel: Channel
    chapter_ids: tuple[int, ...]
    minutes: float
    min_seconds: float
    max_seconds: float


def allocate(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Split `total` speakers over the subsets in proportion to `shares` (largest remainder), at least one each."""
    used = [s for s in LIBRISPEECH_SUBSETS if shares.get(s, 0) > 0]
    weights = np.array([shares[s] for s in used], dtype=float)
    spare = total - len(used)
    exact = weights / weights.sum() * spare
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: spare - counts.sum()]:
        counts[i] += 1
    return {s: int(c) + 1 for s, c in zip(used, counts, strict=True)}


def plan_speakers(cfg: LibriSpeechSynthConfig, root: Path) -> list[SpeakerPlan]:
    rng = np.random.default_rng(cfg.seed)
    counts = allocate(cfg.speakers, cfg.subsets)
    speaker_ids = rng.choice(np.arange(10, 10000), size=cfg.speakers, replace=False)
    chapter_ids = rng.choice(np.arange(100, 300000), size=cfg.speakers * cfg.chapters, replace=False)
    plans = []
    for subset, count in counts.items():
        sexes = rng.permutation(["F" if i % 2 == 0 else "M" for i in range(count)])
        noisy = "-other" in subset
        for sex in sexes:
            n = len(plans)
            plans.append(
                SpeakerPlan(
                    root=root,
                    seed=cfg.seed,
                    speaker_id=int(speaker_ids[n]),
                    subset=subset,
                    sex=str(sex),
                    name=random_name(rng, str(sex)),
                    voice=random_voice(rng, str(sex)),
                    channel=random_channel(
                        rng,
                        tuple(cfg.other_snr_db if noisy else cfg.clean_snr_db),
                        tuple(cfg.other_reverb_s) if noisy else (0.0, 0.0),
                    ),
                    chapter_ids=tuple(int(c) for c in sorted(chapter_ids[n * cfg.chapters : (n + 1) * cfg.chapters])),
                    minutes=cfg.minutes,
                    min_seconds=cfg.min_seconds,
                    max_seconds=cfg.max_seconds,
                )
            )
    return plans


class _Reading:
    """A reader's position in the text: words are taken in order, wrapping at the end of the sentence bank."""

    def __init__(self, start: int):
        self.words = [w for s in sentences()[start:] + sentences()[:start] for w in s.split()]
        self.cursor = 0

    def peek(self, n: int) -> list[str]:
        return [self.words[(self.cursor + i) % len(self.words)] for i in range(n)]

    def advance(self, n: int) -> None:
        self.cursor = (self.cursor + n) % len(self.words)


def _speak_utterance(
    reading: _Reading, target_s: float, voice: Voice, min_s: float, max_s: float
) -> tuple[np.ndarray, str]:
    """Speak about `target_s` seconds of the next words: a search over the word count for a length within
    [min_s, max_s]. Where no count fits (one more word jumps past max_s), the longest that stays below max_s is
    padded with trailing silence up to min_s."""
    n = max(1, round(target_s * voice.rate / 60))
    too_short: tuple[int, np.ndarray] | None = None  # the longest count known to be too short, and its audio
    too_long = None  # the shortest count known to be too long
    while True:
        wav = speak(" ".join(reading.peek(n)), voice)
        seconds = len(wav) / SAMPLE_RATE
        if seconds > max_s:
            if n == 1:
                raise RuntimeError(f"one word lasts {seconds:.1f} s > max_seconds {max_s} with voice {voice}")
            too_long = n
        elif seconds < min_s:
            too_short = (n, wav)
        else:
            break
        low = too_short[0] if too_short else 0
        if too_long is None:
            n = max(n + 1, int(n * min_s / max(seconds, 0.05)) + 1)
        elif too_long - low > 1:
            n = (low + too_long) // 2 if too_short else max(1, min(too_long - 1, int(n * max_s / seconds * 0.9)))
        else:
            n, wav = too_short
            wav = np.concatenate([wav, np.zeros(int(np.ceil(min_s * SAMPLE_RATE)) - len(wav), dtype=np.float32)])
            break
    text = " ".join(reading.peek(n))
    reading.advance(n)
    return wav, text


def synthesize_speaker(plan: SpeakerPlan) -> dict:
    """Record all chapters of one speaker (runs in a worker process)."""
    rng = np.random.default_rng([plan.seed, plan.speaker_id])
    budget = plan.minutes * 60 / len(plan.chapter_ids)
    total_s, utterances = 0.0, 0
    for chapter in plan.chapter_ids:
        folder = plan.root / plan.subset / str(plan.speaker_id) / str(chapter)
        reading = _Reading(int(rng.integers(len(sentences()))))
        lines, chapter_s = [], 0.0
        while chapter_s < budget:
            target = float(rng.uniform(plan.min_seconds, plan.max_seconds))
            speech, text = _speak_utterance(
                reading, target, plan.voice.with_jitter(rng), plan.min_seconds, plan.max_seconds
            )
            wav = apply_channel(speech, plan.channel, rng)
            utt_id = f"{plan.speaker_id}-{chapter}-{len(lines):04d}"
            write_audio(folder / f"{utt_id}.flac", wav)
            lines.append(f"{utt_id} {normalize_transcript(text)}")
            chapter_s += len(wav) / SAMPLE_RATE
        atomic_write_text(folder / f"{plan.speaker_id}-{chapter}.trans.txt", "\n".join(lines) + "\n")
        total_s += chapter_s
        utterances += len(lines)
    return {"speaker_id": plan.speaker_id, "seconds": total_s, "utterances": utterances}


def _speakers_txt(plans: list[SpeakerPlan], seconds: dict[int, float]) -> str:
    lines = [
        "; Synthetic speakers made by fedhubert with espeak-ng; columns as in LibriSpeech's SPEAKERS.TXT.",
        "; How each voice was made is in voices.json.",
        ";ID  |SEX| SUBSET           |MINUTES| NAME",
    ]
    for p in sorted(plans, key=lambda p: p.speaker_id):
        lines.append(f"{p.speaker_id:<5}| {p.sex} | {p.subset:<17}| {seconds[p.speaker_id] / 60:5.2f} | {p.name}")
    return "\n".join(lines) + "\n"


def synthesize_librispeech(cfg: LibriSpeechSynthConfig, root: Path, run: StageRun) -> dict:
    """Write the corpus under `root` (which the caller has prepared) and return a summary."""
    espeak_binary()  # fail before planning if espeak-ng is missing
    plans = plan_speakers(cfg, root)
    log.info(
        "synthesising %d speakers x %.1f min into %s (%s)",
        len(plans),
        cfg.minutes,
        root,
        ", ".join(f"{s}: {n}" for s, n in allocate(cfg.speakers, cfg.subsets).items()),
    )
    results: dict[int, dict] = {}
    for index, result in parallel_map(synthesize_speaker, plans, workers=cfg.workers, desc="speakers", unit="spk"):
        results[plans[index].speaker_id] = result
    seconds = {spk: r["seconds"] for spk, r in results.items()}
    atomic_write_text(root / SPEAKERS_FILE, _speakers_txt(plans, seconds))
    voices = {
        str(p.speaker_id): {
            "subset": p.subset,
            "sex": p.sex,
            "name": p.name,
            "voice": p.voice.as_dict(),
            "channel": p.channel.as_dict(),
            "chapters": list(p.chapter_ids),
            "utterances": results[p.speaker_id]["utterances"],
            "seconds": round(seconds[p.speaker_id], 3),
        }
        for p in sorted(plans, key=lambda p: p.speaker_id)
    }
    atomic_write_text(root / VOICES_FILE, json.dumps(voices, indent=2) + "\n")
    per_subset: dict[str, dict] = {}
    for p in plans:
        row = per_subset.setdefault(p.subset, {"speakers": 0, "female": 0, "utterances": 0, "hours": 0.0})
        row["speakers"] += 1
        row["female"] += p.sex == "F"
        row["utterances"] += results[p.speaker_id]["utterances"]
        row["hours"] += seconds[p.speaker_id] / 3600
    for subset, row in per_subset.items():
        row["hours"] = round(row["hours"], 4)
        log.info(
            "%-16s %3d speakers (%d F) %5d utterances %7.3f h",
            subset,
            row["speakers"],
            row["female"],
            row["utterances"],
            row["hours"],
        )
    summary = {
        "speakers": len(plans),
        "utterances": sum(r["utterances"] for r in results.values()),
        "hours": round(sum(seconds.values()) / 3600, 4),
        "subsets": per_subset,
    }
    run.summary.update(summary)
    return summary
