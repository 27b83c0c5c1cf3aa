"""Config of `fedhubert probe` (kept free of torch: the CLI reads it for --help).

A linear probe of frozen representations: every clip of a Speech Commands-layout folder goes through each frozen
model once; its hidden states are mean-pooled over time and a logistic regression on them is scored by
speaker-disjoint cross-validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedhubert.config import param
from fedhubert.errors import ConfigError

# What the stage writes into its output folder, replaced as a whole by --force.
OUTPUTS = ("probe.json", "probe.md")


@dataclass
class ProbeConfig:
    dataset: Path | None = param(
        None,
        "folder holding speech_commands_v0.01/<word>/<speaker>_nohash_<n>.wav, as 'fedhubert synth "
        "speech-commands' writes it (required)",
    )
    checkpoints: list[Path] = param(
        [], "fedhubert checkpoints to probe: HuBERTs (train-local, pretrain) or distilled students (distill)"
    )
    random_init: bool = param(
        False, "also probe each checkpoint's architecture freshly initialised (seed 0), beside its trained weights"
    )
    layer: int | None = param(
        None,
        "the hidden state to probe: 0 is the CNN/projection output, N the output of transformer layer N "
        "(null: every layer's mean-pool, concatenated)",
        ge=0,
    )
    words: list[str] = param(
        [],
        "only these word folders (empty: every word folder but _background_noise_); "
        'quote yes, no, on and off, which YAML reads as true and false: words=\'["yes","no"]\'',
    )
    max_speakers: int = param(0, "probe the clips of this many speakers, drawn with the seed (0: every speaker)", ge=0)
    folds: int = param(5, "speaker-disjoint cross-validation folds", ge=2)
    c: float = param(1.0, "inverse L2 regularisation strength of the logistic regression (scikit-learn's C)", gt=0)
    max_iter: int = param(5000, "L-BFGS iterations of the logistic regression", ge=1)
    seed: int = param(0, "seed of the speaker sample and the fold assignment", ge=0)
    batch_size: int = param(32, "clips per forward pass", ge=1)
    threads: int = param(0, "CPU threads of the forward passes (torch.set_num_threads; 0: torch's default)", ge=0)
    device: str = param("cpu", "cpu, cuda, or auto (cuda when torch sees a GPU)")

    def validate(self) -> None:
        if self.dataset is None:
            raise ConfigError("key 'dataset' is required: pass --dataset DIR (holding speech_commands_v0.01/)")
        if not self.checkpoints:
            raise ConfigError("key 'checkpoints' is empty: pass --checkpoint CKPT (repeat it for more models)")
        if len(set(self.checkpoints)) != len(self.checkpoints):
            raise ConfigError(f"key 'checkpoints' lists a checkpoint twice: {[str(p) for p in self.checkpoints]}")
        if 0 < self.max_speakers < self.folds:
            raise ConfigError(
                f"max_speakers ({self.max_speakers}) is below folds ({self.folds}): every fold needs "
                f"its own speakers; raise max_speakers or lower folds"
            )
        if self.device not in ("cpu", "auto") and not self.device.startswith("cuda"):
            raise ConfigError(f"key 'device' must be cpu, cuda, cuda:N or auto, got {self.device!r}")
