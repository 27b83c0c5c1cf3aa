"""A per-corpus cache of audio headers, kept outside the corpus (which is never written).

One TSV file per corpus root under the cache folder: a header line naming the format and the root, then
`path  size  mtime_ns  sample_rate  channels  samples  verified  problem` per file. An entry is reused only while
the file's size and modification time are unchanged. An unreadable cache is ignored (and rebuilt), never fatal.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fedhubert.atomic import atomic_write_text

log = logging.getLogger(__name__)

_FORMAT = "fedhubert-header-cache-v1"


@dataclass(frozen=True)
class CachedHeader:
    size: int
    mtime_ns: int
    sample_rate: int
    channels: int
    num_samples: int
    problem: str
    verified: bool


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedhubert"


class HeaderCache:
    def __init__(self, cache_dir: Path, root: Path):
        self.root = str(Path(root).resolve())
        key = hashlib.sha256(self.root.encode("utf-8")).hexdigest()[:20]
        self.path = Path(cache_dir) / f"headers-{key}.tsv"

    def load(self) -> dict[str, CachedHeader]:
        if not self.path.is_file():
            return {}
        entries: dict[str, CachedHeader] = {}
        try:
            with open(self.path, encoding="utf-8") as handle:
                first = handle.readline().rstrip("\n").split("\t")
                if first != [_FORMAT, self.root]:
                    log.warning("ignoring header cache %s: made for another corpus or version", self.path)
                    return {}
                for line in handle:
                    rel, size, mtime, rate, channels, samples, verified, problem = line.rstrip("\n").split("\t", 7)
                    entries[rel] = CachedHeader(
                        int(size), int(mtime), int(rate), int(channels), int(samples), problem, verified == "1"
                    )
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable header cache %s (%s); rescanning", self.path, err)
            return {}
        return entries

    def save(self, entries: dict[str, CachedHeader]) -> None:
        lines = [f"{_FORMAT}\t{self.root}"]
        for rel in sorted(entries):
            e = entries[rel]
            problem = e.problem.replace("\t", " ").replace("\n", " ")
            lines.append(
                f"{rel}\t{e.size}\t{e.mtime_ns}\t{e.sample_rate}\t{e.channels}\t{e.num_samples}\t"
                f"{int(e.verified)}\t{problem}"
            )
        try:
            atomic_write_text(self.path, "\n".join(lines) + "\n")
        except OSError as err:
            log.warning("could not write the header cache %s (%s); the next scan reads headers again", self.path, err)
