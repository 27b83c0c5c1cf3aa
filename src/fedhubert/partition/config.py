"""Config of `fedhubert partition` (kept free of heavy imports: the CLI reads it for --help)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedhubert.config import param
from fedhubert.corpus.librispeech import LIBRISPEECH_SUBSETS
from fedhubert.errors import ConfigError

# What the stage writes into its output folder (names or glob patterns), replaced as a whole by --force.
OUTPUTS = ("partition.json", "rejected.tsv", "summary.md", "clients.png", "global", "client_configs", "client_[0-9]*")


@dataclass
class DirichletConfig:
    alpha: float = param(0.5, "concentration of Dirichlet(alpha); small alpha gives strongly skewed clients", gt=0)
    attribute: Literal["sex", "subset"] = param("sex", "speaker attribute whose mix is skewed across clients")


@dataclass
class QuantityConfig:
    exponent: float = param(
        1.0, "client k (k = 1, 2, ...) gets audio in proportion to k^-exponent; 0 gives equal sizes", ge=0, le=10
    )


@dataclass
class NaturalConfig:
    speakers_per_client: int = param(1, "speakers per client (one client per speaker, or per group of G)", ge=1)


@dataclass
class ValidationConfig:
    fraction: float = param(0.1, "share of each client's data held out as its validation set (0: none)", ge=0, lt=1)
    min_speakers: int = param(
        5, "a client with at least this many speakers holds out whole speakers, else utterances", ge=2
    )


@dataclass
class PartitionConfig:
    corpus: Path | None = param(None, "LibriSpeech root, the folder holding SPEAKERS.TXT (required)")
    train_subsets: list[str] = param(
        ["train-clean-100", "train-clean-360", "train-other-500"],
        "subsets shared among the clients",
        choices=LIBRISPEECH_SUBSETS,
    )
    heldout_subsets: list[str] = param(
        ["dev-clean", "test-clean", "dev-other", "test-other"],
        "held-out subsets written as global manifests (those absent from the corpus are skipped)",
        choices=LIBRISPEECH_SUBSETS,
    )
    scheme: Literal["balanced", "dirichlet", "quantity", "natural"] = param(
        "balanced",
        "balanced: equal hours; dirichlet: skewed attribute mix; quantity: power-law sizes; "
        "natural: clients of natural.speakers_per_client speakers",
    )
    num_clients: int | None = param(
        8, "number of clients; with 'natural', null keeps every group as a client and a number samples groups", ge=1
    )
    seed: int = param(0, "random seed; the same seed gives the same partition", ge=0)
    dirichlet: DirichletConfig = param(DirichletConfig(), "options of the dirichlet scheme")
    quantity: QuantityConfig = param(QuantityConfig(), "options of the quantity scheme")
    natural: NaturalConfig = param(NaturalConfig(), "options of the natural scheme")
    validation: ValidationConfig = param(ValidationConfig(), "per-client validation split")
    verify_audio: bool = param(False, "also decode every file to catch truncated audio (slow)")
    use_cache: bool = param(True, "reuse audio headers of unchanged files from earlier scans")
    cache_dir: Path | None = param(None, "where the header cache lives (null: $XDG_CACHE_HOME/fedhubert)")
    workers: int = param(0, "worker processes for scanning; 0 means one per CPU core", ge=0)

    def validate(self) -> None:
        if self.corpus is None:
            raise ConfigError("key 'corpus' is required: pass --corpus ROOT (the folder holding SPEAKERS.TXT)")
        if not self.train_subsets:
            raise ConfigError("key 'train_subsets' must name at least one subset")
        both = sorted(set(self.train_subsets) & set(self.heldout_subsets))
        if both:
            raise ConfigError(f"subsets {both} are in both 'train_subsets' and 'heldout_subsets'")
        if self.scheme != "natural" and self.num_clients is None:
            raise ConfigError(f"key 'num_clients' must be set for the {self.scheme} scheme")
