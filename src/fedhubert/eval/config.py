"""Config of `fedhubert evaluate speech-commands` (kept free of torch: the CLI reads it for --help).

The defaults are the SUPERB speech_commands recipe of S3PRL (s3prl/downstream/speech_commands/config.yaml):
Adam at 1e-4, batch 32, 200,000 steps, evaluation every 4,000, an utterance-level mean-pooling model on a 256-dim
projection of the upstream's weighted hidden states. Shorten `total_steps` for quick runs: unless set, `eval_step`
and `log_step` follow it (about 10 evaluations and 100 loss lines, never more often than the recipe's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedhubert.config import param
from fedhubert.errors import ConfigError

# What the stage writes into its output folder, replaced as a whole by --force.
OUTPUTS = ("s3prl", "upstream.pt", "upstream.pt.json", "s3prl_config.yaml", "s3prl.log", "result.json", "result.md")
BASELINES = ("fbank", "mfcc", "spectrogram")  # S3PRL upstreams that need no download
EVAL_STEP, LOG_STEP = 4000, 100  # the recipe's, for its 200,000 steps


@dataclass
class SpeechCommandsConfig:
    dataset: Path | None = param(
        None, "folder holding speech_commands_v0.01/ and speech_commands_test_set_v0.01/ (required)"
    )
    checkpoint: Path | None = param(
        None,
        "a fedhubert checkpoint: a HuBERT (evaluated as S3PRL's hubert_local) or a distilled student (distiller_local)",
    )
    baseline: str | None = param(
        None, "instead of a checkpoint: an S3PRL upstream that needs no download", choices=list(BASELINES)
    )
    random_init: bool = param(False, "the checkpoint's architecture with fresh random weights (no pretraining)")
    name: str | None = param(None, "how this evaluation is named in the results table (null: from the model)")
    total_steps: int = param(200000, "downstream training steps (SUPERB: 200,000)", ge=1)
    eval_step: int = param(
        EVAL_STEP, "evaluate on dev (and test) every this many steps (unset: total_steps / 10, at most 4000)", ge=1
    )
    log_step: int = param(
        LOG_STEP, "log the training loss every this many steps (unset: total_steps / 100, at most 100)", ge=1
    )
    batch_size: int = param(32, "utterances per batch", ge=1)
    lr: float = param(1e-4, "Adam learning rate of the downstream model", gt=0)
    projector_dim: int = param(256, "projection of the upstream features", ge=1)
    num_workers: int = param(2, "S3PRL DataLoader workers", ge=0)
    seed: int = param(1337, "S3PRL's seed", ge=0)
    device: str = param("auto", "cpu, cuda, or auto")
    table: Path | None = param(None, "run-level results table (.jsonl) to append to (null: results.jsonl beside --out)")

    def fill_defaults(self, given: frozenset[str]) -> None:
        """A shortened run (`--steps N`) evaluates and logs in proportion, unless eval_step or log_step were set."""
        if "eval_step" not in given:
            self.eval_step = min(EVAL_STEP, max(1, self.total_steps // 10))
        if "log_step" not in given:
            self.log_step = min(LOG_STEP, max(1, self.total_steps // 100))

    def validate(self) -> None:
        if self.dataset is None:
            raise ConfigError("key 'dataset' is required: pass --dataset DIR (holding speech_commands_v0.01/)")
        if (self.checkpoint is None) == (self.baseline is None):
            raise ConfigError("give exactly one of 'checkpoint' (--checkpoint CKPT) or 'baseline' (--baseline fbank)")
        if self.eval_step > self.total_steps:
            raise ConfigError(
                f"eval_step ({self.eval_step}) is above total_steps ({self.total_steps}): S3PRL would "
                f"never evaluate; lower eval_step"
            )
        if self.random_init and self.checkpoint is None:
            raise ConfigError("key 'random_init' needs a checkpoint (whose architecture it re-initialises)")
