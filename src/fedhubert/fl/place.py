"""Where one client's files are: its manifests in the partition, its k-means labels, and its own outputs.

`<partition>/client_<i>/<split>.tsv`, `<kmeans>/client_<i>/<split>.km` (written there by the k-means task, read by
the training tasks), and the client's work folder (training: its local label heads; k-means: its features)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClientPlace:
    """One client's folders; the same type for the k-means task and the training tasks."""

    index: int
    partition: Path
    kmeans: Path | None  # the k-means run's folder (None: no labels, e.g. distillation without the k-means term)
    work: Path

    @property
    def folder(self) -> str:
        """The client's folder name in the partition and in the k-means run: `client_<i>`."""
        return f"client_{self.index}"

    def manifest(self, split: str) -> Path:
        return self.partition / self.folder / f"{split}.tsv"

    def labels(self, split: str) -> Path | None:
        return self.kmeans / self.folder / f"{split}.km" if self.kmeans else None

    def pair(self, split: str) -> tuple[Path, Path | None]:
        return self.manifest(split), self.labels(split)

    def has(self, split: str) -> bool:
        """Whether the split's manifest exists and lists at least one utterance."""
        manifest = self.manifest(split)
        return manifest.is_file() and len(manifest.read_text().splitlines()) > 1
