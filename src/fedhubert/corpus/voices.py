"""Distinct, consistent synthetic speakers: accent, sex-matched timbre, pitch, rate, name and recording channel."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fedhubert.corpus.espeak import Voice

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS = {
    "F": ("f1", "f2", "f3", "f4", "f5", "Alicia", "Andrea", "Annie", "belinda", "linda", "steph", "anika"),
    "M": (
        "m1",
        "m2",
        "m3",
        "m4",
        "m5",
        "m6",
        "m7",
        "adam",
        "Alex",
        "Andy",
        "benjamin",
        "caleb",
        "david",
        "ed",
        "john",
        "Lee",
        "max",
        "Michael",
        "paul",
        "rob",
        "robert",
        "zac",
        "norbert",
        "travis",
        "victor",
    ),
}
PITCH = {"F": (45, 85), "M": (15, 50)}
RATE = (140, 185)

FIRST_NAMES = {
    "F": (
        "Ada",
        "Beatrice",
        "Clara",
        "Dora",
        "Edith",
        "Flora",
        "Grace",
        "Hannah",
        "Iris",
        "Julia",
        "Kate",
        "Lydia",
        "Mabel",
        "Nora",
        "Olive",
        "Pearl",
        "Rose",
        "Sylvia",
        "Tessa",
        "Vera",
        "Winifred",
        "Zelda",
    ),
    "M": (
        "Albert",
        "Bernard",
        "Cecil",
        "Daniel",
        "Edgar",
        "Frank",
        "George",
        "Henry",
        "Isaac",
        "James",
        "Kenneth",
        "Leonard",
        "Martin",
        "Nathan",
        "Oscar",
        "Peter",
        "Ralph",
        "Samuel",
        "Thomas",
        "Victor",
        "Walter",
        "Arthur",
    ),
}
SURNAMES = (
    "Abbott",
    "Baker",
    "Carter",
    "Dawson",
    "Ellis",
    "Fletcher",
    "Gray",
    "Hughes",
    "Irving",
    "Jensen",
    "Keller",
    "Lambert",
    "Morgan",
    "Nash",
    "Owens",
    "Porter",
    "Quinn",
    "Reed",
    "Shaw",
    "Turner",
    "Upton",
    "Vaughn",
    "Webb",
    "Young",
)

NOISE_COLOURS = ("white", "pink", "brown")


@dataclass(frozen=True)
class Channel:
    """How a speaker's recordings sound: microphone band, level, background noise and room."""

    highpass_hz: float
    lowpass_hz: float
    level_dbfs: float
    snr_db: float
    noise_colour: str
    reverb_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def random_voice(rng: np.random.Generator, sex: str) -> Voice:
    return Voice(
        language=str(rng.choice(ACCENTS)),
        variant=str(rng.choice(VARIANTS[sex])),
        pitch=int(rng.integers(*PITCH[sex], endpoint=True)),
        rate=int(rng.integers(*RATE, endpoint=True)),
        word_gap=int(rng.integers(0, 3)),
    )


def random_name(rng: np.random.Generator, sex: str) -> str:
    return f"{rng.choice(FIRST_NAMES[sex])} {rng.choice(SURNAMES)}"


def random_channel(rng: np.random.Generator, snr_db: tuple[float, float], reverb_s: tuple[float, float]) -> Channel:
    return Channel(
        highpass_hz=round(float(rng.uniform(50, 200)), 1),
        lowpass_hz=round(float(rng.uniform(5000, 7600)), 1),
        level_dbfs=round(float(rng.uniform(-28, -20)), 2),
        snr_db=round(float(rng.uniform(*snr_db)), 2),
        noise_colour=str(rng.choice(NOISE_COLOURS)),
        reverb_s=round(float(rng.uniform(*reverb_s)), 3),
    )
