"""fairseq-style manifests and the files aligned with them, line by line.

A manifest (`.tsv`) has the audio root on its first line, then one `relative/path.flac<TAB>num_samples` line per
utterance. Aligned files share its order: transcripts (`.wrd`, one utterance per line) and k-means labels
(`.km`, space-separated cluster ids). Readers refuse paths that leave the root (absolute paths, `..`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fedhubert.atomic import atomic_write_text
from fedhubert.errors import FedhubertError


class ManifestError(FedhubertError):
    """A manifest or an aligned file is malformed."""


@dataclass(frozen=True)
class ManifestEntry:
    path: str  # relative to the manifest's root, POSIX separators
    num_samples: int


@dataclass(frozen=True)
class Manifest:
    root: Path
    entries: tuple[ManifestEntry, ...]

    def __len__(self) -> int:
        return len(self.entries)

    def audio_path(self, index: int) -> Path:
        return self.root / self.entries[index].path


def _check_relative(path: str, where: str) -> str:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path:
        raise ManifestError(f"{where}: path {path!r} must be relative to the manifest root and stay inside it")
    return path


def write_manifest(path: Path, root: Path, entries: Iterable[ManifestEntry]) -> None:
    lines = [str(Path(root).resolve())]
    for entry in entries:
        _check_relative(entry.path, str(path))
        if "\t" in entry.path or "\n" in entry.path:
            raise ManifestError(f"{path}: path {entry.path!r} contains a tab or newline")
        lines.append(f"{entry.path}\t{entry.num_samples}")
    atomic_write_text(Path(path), "\n".join(lines) + "\n")


def read_manifest(path: Path) -> Manifest:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ManifestError(f"cannot read manifest {path}: {err}") from None
    if not lines or not lines[0].strip():
        raise ManifestError(f"{path}: the first line must be the audio root folder")
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2 or not fields[1].strip().isdigit():
            raise ManifestError(f"{path}:{number}: expected 'relative/path<TAB>num_samples', got {line!r}")
        entries.append(ManifestEntry(_check_relative(fields[0], f"{path}:{number}"), int(fields[1])))
    return Manifest(Path(lines[0].strip()), tuple(entries))


def write_aligned_lines(path: Path, lines: Sequence[str], manifest_length: int) -> None:
    """Write a file aligned with a manifest (one line per utterance), refusing a count that does not match."""
    if len(lines) != manifest_length:
        raise ManifestError(f"{path}: {len(lines)} lines for a manifest of {manifest_length} utterances")
    if any("\n" in line for line in lines):
        raise ManifestError(f"{path}: a line contains a newline")
    atomic_write_text(Path(path), "".join(f"{line}\n" for line in lines))


def read_aligned_lines(path: Path, manifest: Manifest, manifest_path: Path | None = None) -> list[str]:
    """Read a file aligned with `manifest`; a line count that differs is an error naming both files."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ManifestError(f"cannot read {path}: {err}") from None
    if len(lines) != len(manifest):
        against = f" ({manifest_path})" if manifest_path else ""
        raise ManifestError(
            f"{path} has {len(lines)} lines but its manifest{against} has {len(manifest)} utterances; "
            f"they must match line by line (regenerate {Path(path).name})"
        )
    return lines


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
