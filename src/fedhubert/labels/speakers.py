"""The speaker of each manifest row, read from its LibriSpeech file name `<speaker>-<chapter>-<utterance>.flac`
(the names `fedhubert partition` keeps; it rejects every other name)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

from fedhubert.corpus.librispeech import UTTERANCE_NAME
from fedhubert.errors import FedhubertError
from fedhubert.manifest import Manifest


class SpeakerError(FedhubertError):
    """A manifest row names no speaker."""


def manifest_speakers(manifest: Manifest, manifest_path: Path) -> np.ndarray:
    """(utterances,) int64 speaker ids of the manifest's rows, in order."""
    speakers = np.empty(len(manifest), dtype=np.int64)
    for i, entry in enumerate(manifest.entries):
        match = UTTERANCE_NAME.fullmatch(PurePosixPath(entry.path).name)
        if match is None:
            raise SpeakerError(
                f"{manifest_path}:{i + 2}: {entry.path!r} is not named <speaker>-<chapter>-<utterance>.flac, so its "
                f"speaker is unknown; speaker statistics need the LibriSpeech file names that manifests made by "
                f"'fedhubert partition' have"
            )
        speakers[i] = int(match[1])
    return speakers
