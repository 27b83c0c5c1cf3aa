"""The Speech Commands v0.01 layout that S3PRL's speech_commands downstream reads, and the dataset's split rule.

`speech_commands_v0.01/<word>/<speaker>_nohash_<n>.wav` (1 s clips at 16 kHz), `_background_noise_/*.wav` (long
recordings, the source of S3PRL's `_silence_` class), `validation_list.txt` and `testing_list.txt`; and a separate
`speech_commands_test_set_v0.01/<class>/` whose classes are the ten keywords, `_unknown_` and `_silence_`.

Framework-free and free of the stages, so that the evaluation and the synthetic generator share it.
"""

from __future__ import annotations

import hashlib

from fedhubert.audio import SAMPLE_RATE

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
TEST_CLASSES = (*KEYWORDS, UNKNOWN, SILENCE)
TRAIN_DIR = "speech_commands_v0.01"
TEST_DIR = "speech_commands_test_set_v0.01"
NOISE_DIR = "_background_noise_"
SPEAKER_SEPARATOR = "_nohash_"  # <speaker>_nohash_<n>.wav
CLIP_SAMPLES = SAMPLE_RATE  # one second at the dataset's 16 kHz
MAX_PER_CLASS = 2**27 - 1  # the constant of the dataset's (and S3PRL's) hash split
SPLITS = ("training", "validation", "testing")


def list_file(split: str) -> str:
    """The name of the file that lists a held-out split's clips: `validation_list.txt` or `testing_list.txt`."""
    return f"{split}_list.txt"


def split_percentage(file_name: str) -> float:
    """The dataset's split rule, as S3PRL applies it: a hash of the speaker part of the name, in percent."""
    speaker = file_name.split(SPEAKER_SEPARATOR)[0]
    digest = int(hashlib.sha1(speaker.encode("utf-8")).hexdigest(), 16)
    return (digest % (MAX_PER_CLASS + 1)) * (100.0 / MAX_PER_CLASS)


def split_of(file_name: str) -> str:
    """training, validation or testing: under 10 %, validation; 10-20 %, testing; the rest, training."""
    pct = split_percentage(file_name)
    return "validation" if pct < 10 else "testing" if pct < 20 else "training"
