"""Scanning a LibriSpeech-layout corpus: speakers, transcripts and audio headers, in parallel, with a cache.

Only headers are read (sample rate, channels, length), in worker processes, in batches. Results are cached per
file, keyed on the file's path, size and modification time, so an unchanged corpus is not read again and a
changed one is read only where it changed. Files that cannot be used are returned as rejections with a reason;
nothing in the corpus is ever written.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedhubert.audio import SAMPLE_RATE, audio_info, read_audio, speech_format_problem
from fedhubert.corpus.header_cache import CachedHeader, HeaderCache
from fedhubert.errors import AudioError, FedhubertError
from fedhubert.parallel import parallel_map

log = logging.getLogger(__name__)

SPEAKERS_FILE = "SPEAKERS.TXT"
LIBRISPEECH_SUBSETS = (
    "train-clean-100",
    "train-clean-360",
    "train-other-500",
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
)
UTTERANCE_NAME = re.compile(r"(\d+)-(\d+)-(\d+)\.flac")  # <speaker>-<chapter>-<utterance>.flac
_BATCH = 256


class CorpusError(FedhubertError):
    """The corpus folder is not a usable LibriSpeech layout."""


@dataclass(frozen=True)
class SpeakerInfo:
    speaker_id: int
    sex: str
    subset: str
    minutes: float
    name: str


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    subset: str
    speaker: int
    chapter: int
    path: str  # relative to the corpus root
    num_samples: int
    transcript: str

    @property
    def seconds(self) -> float:
        return self.num_samples / SAMPLE_RATE


@dataclass(frozen=True)
class Rejection:
    path: str
    reason: str


@dataclass
class ScanResult:
    root: Path
    subsets: list[str]
    speakers: dict[int, SpeakerInfo]
    utterances: list[Utterance]
    rejected: list[Rejection]
    stats: dict = field(default_factory=dict)


def read_speakers_txt(root: Path) -> dict[int, SpeakerInfo]:
    path = root / SPEAKERS_FILE
    if not path.is_file():
        raise CorpusError(
            f"{path} not found: --corpus must be a LibriSpeech root, the folder holding SPEAKERS.TXT and the "
            f"subset folders (train-clean-100, dev-clean, ...)"
        )
    speakers: dict[int, SpeakerInfo] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        parts = [p.strip() for p in line.split("|", 4)]
        if len(parts) != 5 or not parts[0].isdigit():
            log.warning("%s:%d: not 'ID | SEX | SUBSET | MINUTES | NAME', skipped: %r", path, number, line)
            continue
        try:
            minutes = float(parts[3])
        except ValueError:
            minutes = float("nan")
        speakers[int(parts[0])] = SpeakerInfo(int(parts[0]), parts[1].upper(), parts[2], minutes, parts[4])
    if not speakers:
        raise CorpusError(f"{path} lists no speakers")
    return speakers


def _read_transcripts(path: Path) -> dict[str, str]:
    texts = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        utt, _, text = line.strip().partition(" ")
        if utt:
            texts[utt] = text.strip()
    return texts


@dataclass(frozen=True)
class _FileStat:
    rel: str
    size: int
    mtime_ns: int


def _walk_subset(root: Path, subset: str, rejected: list[Rejection]) -> tuple[list[_FileStat], dict[str, str]]:
    """Every .flac under <subset>/<speaker>/<chapter>/ with its stat, and the chapter transcripts (by utt id)."""
    files: list[_FileStat] = []
    transcripts: dict[str, str] = {}
    for speaker_dir in sorted(os.scandir(root / subset), key=lambda e: e.name):
        if not speaker_dir.is_dir():
            continue
        for chapter_dir in sorted(os.scandir(speaker_dir.path), key=lambda e: e.name):
            if not chapter_dir.is_dir():
                continue
            trans_name = f"{speaker_dir.name}-{chapter_dir.name}.trans.txt"
            for entry in sorted(os.scandir(chapter_dir.path), key=lambda e: e.name):
                rel = f"{subset}/{speaker_dir.name}/{chapter_dir.name}/{entry.name}"
                if entry.name == trans_name:
                    transcripts.update(_read_transcripts(Path(entry.path)))
                elif entry.name.endswith(".flac") and entry.is_file():
                    match = UTTERANCE_NAME.fullmatch(entry.name)
                    if not match or (match[1], match[2]) != (speaker_dir.name, chapter_dir.name):
                        rejected.append(Rejection(rel, "file name is not <speaker>-<chapter>-<n>.flac of its folders"))
                        continue
                    stat = entry.stat()
                    files.append(_FileStat(rel, stat.st_size, stat.st_mtime_ns))
    return files, transcripts


def read_headers(job: tuple[str, list[str], bool]) -> list[tuple[int, int, int, str]]:
    """(sample rate, channels, samples, problem) per file; runs in a worker process."""
    root, rels, verify = job
    out = []
    for rel in rels:
        path = Path(root) / rel
        try:
            info = audio_info(path)
        except AudioError as err:
            out.append((0, 0, 0, f"unreadable header: {str(err).split(': ', 1)[-1]}"))
            continue
        problem = speech_format_problem(info) or ""
        if verify and not problem:
            try:
                read_audio(path)
            except AudioError as err:
                problem = f"undecodable: {str(err).split('; ', 1)[-1]}"
        out.append((info.sample_rate, info.channels, info.num_samples, problem))
    return out


def scan_librispeech(
    root: Path, subsets: list[str], *, workers: int, cache_dir: Path | None, verify_audio: bool = False
) -> ScanResult:
    """Scan the given subsets of a LibriSpeech-layout corpus (missing subsets are skipped and not listed)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise CorpusError(f"corpus folder {root} does not exist")
    speakers = read_speakers_txt(root)
    started = time.perf_counter()
    rejected: list[Rejection] = []
    files: list[_FileStat] = []
    transcripts: dict[str, str] = {}
    present = [s for s in subsets if (root / s).is_dir()]
    for subset in present:
        subset_files, subset_texts = _walk_subset(root, subset, rejected)
        files.extend(subset_files)
        transcripts.update(subset_texts)

    cache = HeaderCache(cache_dir, root) if cache_dir is not None else None
    known = cache.load() if cache else {}
    headers: dict[str, CachedHeader] = {}
    todo: list[_FileStat] = []
    for f in files:
        hit = known.get(f.rel)
        if hit and hit.size == f.size and hit.mtime_ns == f.mtime_ns and (hit.verified or not verify_audio):
            headers[f.rel] = hit
        else:
            todo.append(f)
    if todo:
        batches = [todo[i : i + _BATCH] for i in range(0, len(todo), _BATCH)]
        jobs = [(str(root), [f.rel for f in batch], verify_audio) for batch in batches]
        for index, results in parallel_map(read_headers, jobs, workers=workers, desc="audio headers", unit="batch"):
            for f, (rate, channels, samples, problem) in zip(batches[index], results, strict=True):
                headers[f.rel] = CachedHeader(f.size, f.mtime_ns, rate, channels, samples, problem, verify_audio)
    if cache is not None and (todo or len(known) != len(headers)):
        cache.save(headers)

    utterances: list[Utterance] = []
    for f in files:
        header = headers[f.rel]
        subset, speaker, chapter, name = f.rel.split("/")
        utt_id = name[: -len(".flac")]
        if header.problem:
            rejected.append(Rejection(f.rel, header.problem))
        elif int(speaker) not in speakers:
            rejected.append(Rejection(f.rel, f"speaker {speaker} is not in {SPEAKERS_FILE}"))
        elif utt_id not in transcripts:
            rejected.append(Rejection(f.rel, f"no transcript line in {speaker}-{chapter}.trans.txt"))
        elif not transcripts[utt_id]:
            rejected.append(Rejection(f.rel, f"empty transcript in {speaker}-{chapter}.trans.txt"))
        else:
            utterances.append(
                Utterance(utt_id, subset, int(speaker), int(chapter), f.rel, header.num_samples, transcripts[utt_id])
            )
    elapsed = time.perf_counter() - started
    stats = {
        "files": len(files) + sum(r.reason.startswith("file name") for r in rejected),
        "headers_read": len(todo),
        "headers_cached": len(files) - len(todo),
        "seconds": round(elapsed, 3),
        "files_per_second": round(len(files) / elapsed, 1) if elapsed > 0 else None,
    }
    rejected.sort(key=lambda r: r.path)
    log.info(
        "scanned %d files in %s (%d headers read, %d from cache) in %.1f s: %d usable, %d rejected",
        stats["files"],
        ", ".join(present) or "no subset",
        len(todo),
        stats["headers_cached"],
        elapsed,
        len(utterances),
        len(rejected),
    )
    return ScanResult(root, present, speakers, utterances, rejected, stats)
