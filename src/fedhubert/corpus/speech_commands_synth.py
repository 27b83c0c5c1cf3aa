"""A small synthetic Speech Commands v0.01 in the layout S3PRL's speech_commands downstream reads (the layout's
names and split rule: `fedhubert.eval.speech_commands_format`).

`<out>/speech_commands_v0.01/<word>/<speaker>_nohash_<n>.wav` (1 s, 16 kHz, 16-bit) for the ten keywords and the
auxiliary words, `_background_noise_/*.wav` (long noise recordings, S3PRL's `_silence_` source),
`validation_list.txt` and `testing_list.txt`; and `<out>/speech_commands_test_set_v0.01/<class>/` with the
ten keywords, `_unknown_` and `_silence_`, spoken by other speakers.

S3PRL ignores the two list files and splits by a hash of the speaker part of each file name (under 10 %: dev,
10-20 %: dropped, the rest: train). Speaker names are drawn so that every split gets its share of speakers, and
the list files are written with the same rule, so both views of the split agree.
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
from fedhubert.corpus.acoustics import apply_channel, coloured_noise, rms
from fedhubert.corpus.espeak import Voice, espeak_binary, speak
from fedhubert.corpus.voices import Channel, random_channel, random_voice
from fedhubert.errors import ConfigError
from fedhubert.eval.speech_commands_format import (
    CLIP_SAMPLES,
    KEYWORDS,
    NOISE_DIR,
    SILENCE,
    SPEAKER_SEPARATOR,
    SPLITS,
    TEST_DIR,
    TRAIN_DIR,
    UNKNOWN,
    list_file,
    split_of,
)
from fedhubert.parallel import parallel_map
from fedhubert.runlog import StageRun

log = logging.getLogger(__name__)

AUXILIARY_WORDS = (
    "bed",
    "bird",
    "cat",
    "dog",
    "eight",
    "five",
    "four",
    "happy",
    "house",
    "marvin",
    "nine",
    "one",
    "seven",
    "sheila",
    "six",
    "three",
    "tree",
    "two",
    "wow",
    "zero",
)
VOICES_FILE = "voices.json"
OUTPUTS = (TRAIN_DIR, TEST_DIR, VOICES_FILE)  # replaced as a whole by --force
NOISE_FILES = ("white_noise", "pink_noise", "brown_noise", "running_tap", "exercise_bike", "doing_the_dishes")


@dataclass
class SpeechCommandsSynthConfig:
    speakers: int = param(
        40, "speakers in speech_commands_v0.01; 10% (at least one) fall in the dev and 10% in the test split", ge=3
    )
    test_speakers: int = param(10, "other speakers, each recorded once per class in the separate test set", ge=1)
    seed: int = param(0, "random seed; the same seed gives byte-identical files", ge=0)
    keyword_repetitions: list[int] = param(
        [1, 2], "[low, high] times each speaker says each keyword (--repetitions N gives [N, N])", ge=1, le=5
    )
    auxiliary_words: list[str] = param(list(AUXILIARY_WORDS), "non-keywords, the _unknown_ class")
    auxiliary_fraction: float = param(0.5, "chance that a speaker says a given auxiliary word (once)", gt=0, le=1)
    snr_db: list[float] = param([10.0, 40.0], "[low, high] signal-to-noise ratio of the speakers' recordings")
    reverb_s: list[float] = param([0.0, 0.3], "[low, high] room reverberation time (RT60)", ge=0)
    noise_seconds: float = param(60.0, "length of each _background_noise_ recording", ge=2, le=600)
    workers: int = param(0, "worker processes; 0 means one per CPU core", ge=0)

    def validate(self) -> None:
        for key in ("keyword_repetitions", "snr_db", "reverb_s"):
            pair = getattr(self, key)
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ConfigError(f"key '{key}' must be [low, high] with low <= high, got {pair}")
        clash = sorted(set(self.auxiliary_words) & set(KEYWORDS))
        if clash:
            raise ConfigError(f"key 'auxiliary_words' must not contain keywords {clash}")
        if not self.auxiliary_words or len(set(self.auxiliary_words)) != len(self.auxiliary_words):
            raise ConfigError("key 'auxiliary_words' must list at least one word, each once")
        bad = [w for w in self.auxiliary_words if not w.isalpha() or not w.islower()]
        if bad:
            raise ConfigError(f"key 'auxiliary_words' must be lower-case words (they become folder names), got {bad}")


@dataclass(frozen=True)
class SpeakerJob:
    root: Path
    seed: int
    index: int
    speaker: str  # 8 hex digits, as in the dataset
    test_set: bool
    voice: Voice
    channel: Channel
    words: tuple[tuple[str, str, int], ...]  # (folder, word spoken, repetition)


def _speaker_names(rng: np.random.Generator, count: int, taken: set[str], quotas: dict[str, int] | None) -> list[str]:
    names: list[str] = []
    left = dict(quotas) if quotas else None
    while len(names) < count:
        name = f"{int(rng.integers(0, 2**32)):08x}"
        if name in taken:
            continue
        if left is not None:
            split = split_of(name)
            if left[split] == 0:
                continue
            left[split] -= 1
        taken.add(name)
        names.append(name)
    return names


def plan_jobs(cfg: SpeechCommandsSynthConfig, out: Path) -> list[SpeakerJob]:
    rng = np.random.default_rng(cfg.seed)
    held = max(1, round(0.1 * cfg.speakers))
    quotas = {"validation": held, "testing": held, "training": cfg.speakers - 2 * held}
    taken: set[str] = set()
    train_names = _speaker_names(rng, cfg.speakers, taken, quotas)
    test_names = _speaker_names(rng, cfg.test_speakers, taken, None)
    jobs = []
    for index, name in enumerate(train_names + test_names):
        test_set = index >= cfg.speakers
        sex = "F" if rng.random() < 0.5 else "M"
        voice = random_voice(rng, sex)
        channel = random_channel(rng, tuple(cfg.snr_db), tuple(cfg.reverb_s))
        if test_set:
            unknown = str(rng.choice(cfg.auxiliary_words))
            words = [(k, k, 0) for k in KEYWORDS] + [(UNKNOWN, unknown, 0), (SILENCE, "", 0)]
        else:
            words = [
                (k, k, r)
                for k in KEYWORDS
                for r in range(int(rng.integers(cfg.keyword_repetitions[0], cfg.keyword_repetitions[1], endpoint=True)))
            ]
            words += [(w, w, 0) for w in cfg.auxiliary_words if rng.random() < cfg.auxiliary_fraction]
        root = out / (TEST_DIR if test_set else TRAIN_DIR)
        jobs.append(SpeakerJob(root, cfg.seed, index, name, test_set, voice, channel, tuple(words)))
    return jobs


def _trim_silence(wav: np.ndarray, threshold_db: float = -35.0) -> np.ndarray:
    """Cut leading and trailing frames more than `threshold_db` below the loudest 10 ms frame."""
    frame = SAMPLE_RATE // 100
    usable = len(wav) // frame * frame
    if usable == 0:
        return wav
    energy = np.sqrt(np.mean(wav[:usable].reshape(-1, frame) ** 2, axis=1) + 1e-12)
    voiced = np.nonzero(20 * np.log10(energy / energy.max()) > threshold_db)[0]
    return wav[voiced[0] * frame : (voiced[-1] + 1) * frame]


def _clip(word: str, voice: Voice, channel: Channel, rng: np.random.Generator) -> np.ndarray:
    """One second holding the spoken word at a random offset, through the speaker's channel."""
    speech = _trim_silence(speak(word, voice))
    while len(speech) > int(0.9 * CLIP_SAMPLES):
        voice = Voice(voice.language, voice.variant, voice.pitch, int(voice.rate * 1.25), voice.word_gap)
        speech = _trim_silence(speak(word, voice))
    canvas = np.zeros(CLIP_SAMPLES, dtype=np.float32)
    offset = int(rng.integers(0, CLIP_SAMPLES - len(speech) + 1))
    canvas[offset : offset + len(speech)] = speech
    return apply_channel(canvas, channel, rng)


def _silence_clip(rng: np.random.Generator) -> np.ndarray:
    colour = str(rng.choice(["white", "pink", "brown"]))
    return coloured_noise(CLIP_SAMPLES, colour, rng) * float(10 ** (rng.uniform(-60, -35) / 20))


def record_speaker(job: SpeakerJob) -> list[str]:
    """Write one speaker's clips (runs in a worker process); returns their paths relative to the folder root."""
    rng = np.random.default_rng([job.seed, job.index])
    written = []
    for folder, word, repetition in job.words:
        wav = _silence_clip(rng) if folder == SILENCE else _clip(word, job.voice.with_jitter(rng), job.channel, rng)
        relative = f"{folder}/{job.speaker}{SPEAKER_SEPARATOR}{repetition}.wav"
        write_audio(job.root / relative, wav)
        written.append(relative)
    return written


def _background_noise(name: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    if name in ("white_noise", "pink_noise", "brown_noise"):
        wav = coloured_noise(n, name.split("_")[0], rng)
    elif name == "running_tap":  # broadband hiss with a slow wobble
        wav = coloured_noise(n, "pink", rng) * (1 + 0.3 * np.sin(2 * np.pi * 0.7 * t))
    elif name == "exercise_bike":  # a low hum pulsing with the pedals
        wav = (np.sin(2 * np.pi * 90 * t) + 0.5 * coloured_noise(n, "brown", rng)) * (
            1 + 0.8 * np.sin(2 * np.pi * 1.3 * t)
        )
    else:  # doing_the_dishes: quiet hiss with random clatters
        wav = 0.2 * coloured_noise(n, "white", rng)
        for start in rng.integers(0, max(1, n - 4000), size=int(seconds * 2)):
            wav[start : start + 4000] += rng.standard_normal(4000) * np.exp(-np.arange(4000) / 600) * 3
    return (wav / (rms(wav) or 1.0) * 0.05).astype(np.float32)


def synthesize_speech_commands(cfg: SpeechCommandsSynthConfig, out: Path, run: StageRun) -> dict:
    """Write both folders under `out` (which the caller has prepared) and return a summary."""
    espeak_binary()
    jobs = plan_jobs(cfg, out)
    log.info("recording %d speakers and %d test-set speakers into %s", cfg.speakers, cfg.test_speakers, out)
    written: dict[int, list[str]] = {}
    for index, paths in parallel_map(record_speaker, jobs, workers=cfg.workers, desc="speakers", unit="spk"):
        written[index] = paths
    rng = np.random.default_rng([cfg.seed, len(jobs)])
    for name in NOISE_FILES:
        write_audio(out / TRAIN_DIR / NOISE_DIR / f"{name}.wav", _background_noise(name, cfg.noise_seconds, rng))
    train_files = sorted(p for job in jobs if not job.test_set for p in written[job.index])
    for split in ("validation", "testing"):
        lines = [p for p in train_files if split_of(Path(p).name) == split]
        atomic_write_text(out / TRAIN_DIR / list_file(split), "".join(f"{p}\n" for p in lines))
    voices = {
        job.speaker: {
            "test_set": job.test_set,
            "voice": job.voice.as_dict(),
            "channel": job.channel.as_dict(),
            "clips": len(written[job.index]),
        }
        for job in jobs
    }
    atomic_write_text(out / VOICES_FILE, json.dumps(voices, indent=2) + "\n")
    test_files = [p for job in jobs if job.test_set for p in written[job.index]]
    splits = {s: sum(split_of(Path(p).name) == s for p in train_files) for s in SPLITS}
    summary = {
        "train_clips": len(train_files),
        "split_clips": splits,
        "test_clips": len(test_files),
        "background_noise_files": len(NOISE_FILES),
        "words": len(KEYWORDS) + len(cfg.auxiliary_words),
    }
    log.info(
        "%d clips in %s (%s), %d in %s",
        len(train_files),
        TRAIN_DIR,
        ", ".join(f"{k}: {v}" for k, v in splits.items()),
        len(test_files),
        TEST_DIR,
    )
    run.summary.update(summary)
    return summary
