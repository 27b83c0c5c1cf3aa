"""`fedhubert evaluate speech-commands`: SUPERB keyword spotting with S3PRL 0.4.18's own `run_downstream`.

Before S3PRL starts, the dataset layout and the checkpoint's kind are checked (clear errors, not a traceback from
inside S3PRL). The upstream is exported into the output folder (`upstream.pt`: hubert_local or distiller_local),
S3PRL trains the downstream model (`s3prl/`, its log in `s3prl/log.log`), and its dev-best checkpoint is evaluated
on the separate test set. Accuracies are read from S3PRL's own log; each gets its 95% Wilson interval over the
clips it was measured on (`dev_ci95`, `test_ci95`). Results: `result.json`, `result.md`, and a row appended to the
run-level table (`results.jsonl` and `results.md`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fedhubert.atomic import atomic_write_text
from fedhubert.audio import AudioError, audio_info
from fedhubert.errors import FedhubertError
from fedhubert.eval.config import SpeechCommandsConfig
from fedhubert.eval.results import append_result, interval_text, intervals, result_markdown
from fedhubert.eval.speech_commands_format import KEYWORDS, NOISE_DIR, TEST_CLASSES, TEST_DIR, TRAIN_DIR, split_of
from fedhubert.manifest import file_sha256
from fedhubert.runlog import StageRun, progress

log = logging.getLogger(__name__)

_DEV = re.compile(r"New best on dev at step (\d+): ([0-9.]+)")
_TEST = re.compile(r"test at step (\d+): ([0-9.]+)")


class EvaluationError(FedhubertError):
    """The evaluation cannot run, or S3PRL failed."""


def check_dataset(root: Path) -> dict:
    """The Speech Commands v0.01 layout S3PRL's speech_commands reads (a clear error for whatever is missing), and
    its clip counts: S3PRL's training and dev split, the background-noise files it adds to both, the test set."""
    train, test = Path(root) / TRAIN_DIR, Path(root) / TEST_DIR
    layout = (
        f"expected {root}/{TRAIN_DIR}/<word>/*.wav (with {NOISE_DIR}/) and {root}/{TEST_DIR}/<class>/*.wav "
        f"(see setup.md, or make one with 'fedhubert synth speech-commands')"
    )
    for folder in (train, test):
        if not folder.is_dir():
            raise EvaluationError(f"{folder} does not exist: {layout}")
    missing = [w for w in KEYWORDS if not any((train / w).glob("*.wav"))]
    if missing:
        raise EvaluationError(f"{train} has no clips of {missing}: {layout}")
    noise_files = sum(1 for _ in (train / NOISE_DIR).glob("*.wav"))
    if not noise_files:
        raise EvaluationError(f"{train / NOISE_DIR} holds no .wav: S3PRL's _silence_ class comes from it")
    missing = [c for c in TEST_CLASSES if not any((test / c).glob("*.wav"))]
    if missing:
        raise EvaluationError(f"{test} has no clips of classes {missing}: {layout}")
    _check_audio([*train.glob("*/*.wav"), *test.glob("*/*.wav")])
    clips = [p for p in train.glob("*/*.wav") if p.parent.name != NOISE_DIR]
    splits = {s: sum(split_of(p.name) == s for p in clips) for s in ("training", "validation")}
    if not splits["validation"] or not splits["training"]:
        raise EvaluationError(
            f"S3PRL's hash split of {train} leaves {splits['training']} training and "
            f"{splits['validation']} dev clips; both must be non-empty (more speakers are needed)"
        )
    return {
        "train_clips": splits["training"],
        "dev_clips": splits["validation"],
        "noise_files": noise_files,
        "test_clips": sum(1 for _ in test.glob("*/*.wav")),
    }


def _check_audio(paths: list[Path]) -> None:
    """Every clip's header must be readable and non-empty: S3PRL would stop mid-training on the first bad one.
    (S3PRL itself converts channels and sample rate with sox, so those are not errors here.)"""
    bad = []
    for path in progress(sorted(paths), desc="checking clips", unit="clip"):
        try:
            if audio_info(path).num_samples <= 0:
                bad.append(f"{path}: empty (no samples)")
        except AudioError as error:
            bad.append(str(error))
    if bad:
        listed = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise EvaluationError(
            f"{len(bad)} of {len(paths)} Speech Commands clips cannot be used (S3PRL would fail on "
            f"them); remove or replace them:\n  {listed}"
        )


def prepare_upstream(cfg: SpeechCommandsConfig, out: Path) -> dict:
    """The S3PRL upstream: a baseline by name, or our checkpoint exported (or its architecture, randomly
    initialised) into `upstream.pt`."""
    if cfg.baseline:
        return {"upstream": cfg.baseline, "file": None, "name": cfg.name or cfg.baseline, "kind": "baseline"}
    from fedhubert.model.checkpoint import CheckpointError, load_checkpoint
    from fedhubert.model.export import export_checkpoint

    try:
        payload = load_checkpoint(cfg.checkpoint)
    except CheckpointError as error:
        export = Path(str(cfg.checkpoint) + ".json")
        if export.is_file():
            source = json.loads(export.read_text()).get("source_checkpoint")
            raise EvaluationError(
                f"{cfg.checkpoint} is an S3PRL export, not a fedhubert checkpoint: pass the "
                f"checkpoint it was exported from ({source}); evaluate exports it itself"
            ) from None
        raise EvaluationError(str(error)) from None
    if payload["kind"] not in ("hubert", "distiller"):
        raise EvaluationError(
            f"{cfg.checkpoint} holds a '{payload['kind']}' model; speech-commands evaluates a "
            f"HuBERT or a distilled student"
        )
    source = Path(cfg.checkpoint)
    if cfg.random_init:
        source = out / "random_init.pt"
        _random_copy(payload, source, cfg.seed)
    fmt = "s3prl-hubert" if payload["kind"] == "hubert" else "s3prl-distiller"
    export_checkpoint(source, fmt, out / "upstream.pt", force=True)
    if cfg.random_init:
        source.unlink()
        Path(str(source) + ".sha256").unlink(missing_ok=True)
    upstream = "hubert_local" if payload["kind"] == "hubert" else "distiller_local"
    model = payload["model"]
    size = (
        model.get("preset", "student")
        if payload["kind"] == "hubert"
        else f"{model['distiller']['encoder_layers']}-layer student"
    )
    default_name = f"{'random-init' if cfg.random_init else payload['kind']} ({size})"
    return {
        "upstream": upstream,
        "file": str(out / "upstream.pt"),
        "name": cfg.name or default_name,
        "kind": payload["kind"],
    }


def _random_copy(payload: dict, path: Path, seed: int) -> None:
    """A checkpoint of the same architecture with freshly initialised weights."""
    import torch

    from fedhubert.model.checkpoint import label_rate_of, model_config_of, save_checkpoint

    torch.manual_seed(seed)
    if payload["kind"] == "hubert":
        from fedhubert.model.hubert import build_hubert

        state = build_hubert(model_config_of(payload), payload["num_classes"]).state_dict()
        model = model_config_of(payload)
    else:
        from fedhubert.model.student import Student

        state = {f"distiller.{k}": v for k, v in Student(payload["model"]["distiller"]).distiller.state_dict().items()}
        model = payload["model"]
    save_checkpoint(
        path,
        kind=payload["kind"],
        model=model,
        num_classes=payload["num_classes"],
        state_dict=state,
        label_rate=label_rate_of(payload),
    )


def s3prl_config(cfg: SpeechCommandsConfig, dataset: Path) -> dict:
    return {
        "runner": {
            "total_steps": cfg.total_steps,
            "gradient_clipping": 1,
            "gradient_accumulate_steps": 1,
            "log_step": cfg.log_step,
            "eval_step": cfg.eval_step,
            "save_step": cfg.eval_step,
            "max_keep": 1,
            "eval_dataloaders": ["dev", "test"],
        },
        "optimizer": {"name": "TorchOptim", "torch_optim_name": "Adam", "lr": cfg.lr},
        "downstream_expert": {
            "datarc": {
                "speech_commands_root": str(dataset / TRAIN_DIR),
                "speech_commands_test_root": str(dataset / TEST_DIR),
                "num_workers": cfg.num_workers,
                "batch_size": cfg.batch_size,
            },
            "modelrc": {
                "projector_dim": cfg.projector_dim,
                "select": "UtteranceLevel",
                "UtteranceLevel": {"pooling": "MeanPooling"},
            },
        },
    }


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError(f"device '{name}' asked for, but torch sees no CUDA GPU here; use device=cpu or auto")
    return name


def _s3prl(args: list[str], log_path: Path, results_log: Path) -> None:
    """Run S3PRL's run_downstream with its output in `log_path`, echoing the accuracy lines S3PRL appends to
    `results_log` (its log.log) as they come; a failure keeps the log and shows its last lines."""
    env = dict(os.environ)
    # S3PRL 0.4.18 loads its own downstream checkpoints (argparse objects inside) with torch.load's old default.
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    env.setdefault("PYTHONWARNINGS", "ignore")
    command = [sys.executable, "-m", "s3prl.run_downstream", *args]
    seen = results_log.stat().st_size if results_log.is_file() else 0
    with open(log_path, "a", encoding="utf-8") as sink:
        sink.write("$ " + " ".join(command) + "\n")
        sink.flush()
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        bar = _ProgressEcho(log_path)
        try:
            while process.poll() is None:
                time.sleep(1.0)
                seen = _echo_new_lines(results_log, seen)
                bar.poll()
        except BaseException:
            process.kill()
            process.wait()
            raise
    _echo_new_lines(results_log, seen)
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise EvaluationError(
            f"S3PRL's run_downstream failed (exit {process.returncode}); its log is {log_path}. "
            f"Last lines:\n  " + "\n  ".join(tail)
        )


# S3PRL's overall progress bar (tqdm, redrawn with carriage returns in its output): "overall:  43%|...| 430/1000
# [00:40<00:55, 10.9it/s]".
_BAR = re.compile(r"overall:\s+(\d+)%\|[^|\r\n]*\|\s*(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")


class _ProgressEcho:
    """Forwards S3PRL's training progress from its output file to the console: a line with the step, elapsed time
    and S3PRL's estimate of the time left, every `every_s` seconds (its bar itself goes only to the file)."""

    def __init__(self, path: Path, every_s: float = 30.0):
        self.path, self.every_s = path, every_s
        self.offset = path.stat().st_size if path.is_file() else 0
        self.said = -math.inf

    def poll(self) -> None:
        if not self.path.is_file() or self.path.stat().st_size <= self.offset:
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        self.offset += len(data)
        bars = _BAR.findall(data.decode("utf-8", errors="replace"))
        if bars and time.monotonic() - self.said >= self.every_s:
            percent, step, total, elapsed, left = bars[-1]
            log.info(
                "S3PRL training: step %s/%s (%s%%), %s elapsed, about %s left", step, total, percent, elapsed, left
            )
            self.said = time.monotonic()


def _echo_new_lines(path: Path, offset: int) -> int:
    if not path.is_file() or path.stat().st_size <= offset:
        return offset
    with open(path, encoding="utf-8", errors="replace") as handle:
        handle.seek(offset)
        text = handle.read()
    complete = text[: text.rfind("\n") + 1]
    for line in complete.splitlines():
        if not line.startswith("train at step"):
            log.info("S3PRL: %s", line)
    return offset + len(complete.encode("utf-8"))


def parse_log(text: str) -> tuple[dict | None, list[tuple[int, float]]]:
    """From S3PRL's log.log: the best dev accuracy (step, acc) and every test accuracy line."""
    best = [(int(s), float(a)) for s, a in _DEV.findall(text)]
    tests = [(int(s), float(a)) for s, a in _TEST.findall(text)]
    return ({"step": best[-1][0], "acc": best[-1][1]} if best else None), tests


def run_speech_commands(cfg: SpeechCommandsConfig, out: Path, run: StageRun) -> dict:
    out = Path(out).resolve()
    dataset = Path(cfg.dataset).resolve()
    device = _device(cfg.device)
    counts = check_dataset(dataset)
    upstream = prepare_upstream(cfg, out)
    config_path = out / "s3prl_config.yaml"
    atomic_write_text(config_path, yaml.safe_dump(s3prl_config(cfg, dataset), sort_keys=False))
    expdir, log_path = out / "s3prl", out / "s3prl.log"
    upstream_args = ["-u", upstream["upstream"]] + (["-k", upstream["file"]] if upstream["file"] else [])
    log.info(
        "S3PRL speech_commands with %s (%s): %d steps on %d training clips, evaluated every %d on %d dev clips",
        upstream["name"],
        upstream["upstream"],
        cfg.total_steps,
        counts["train_clips"],
        cfg.eval_step,
        counts["dev_clips"],
    )
    _s3prl(
        [
            "-m",
            "train",
            *upstream_args,
            "-d",
            "speech_commands",
            "-c",
            str(config_path),
            "-p",
            str(expdir),
            "--device",
            device,
            "--seed",
            str(cfg.seed),
        ],
        log_path,
        expdir / "log.log",
    )
    training_log = (expdir / "log.log").read_text()
    best, _ = parse_log(training_log)
    if best is None or not (expdir / "dev-best.ckpt").is_file():
        raise EvaluationError(
            f"S3PRL wrote no dev result in {expdir / 'log.log'}: total_steps ({cfg.total_steps}) must "
            f"reach at least one eval_step ({cfg.eval_step})"
        )
    log.info("best dev accuracy %.4f at step %d; testing that checkpoint", best["acc"], best["step"])
    _s3prl(["-m", "evaluate", "-e", str(expdir / "dev-best.ckpt"), "--device", device], log_path, expdir / "log.log")
    _, tests = parse_log((expdir / "log.log").read_text()[len(training_log) :])
    if not tests:
        raise EvaluationError(f"S3PRL's evaluation wrote no test accuracy in {expdir / 'log.log'}")
    result = {
        "task": "speech_commands",
        "name": upstream["name"],
        "upstream": upstream["upstream"],
        "kind": upstream["kind"],
        "checkpoint": str(cfg.checkpoint) if cfg.checkpoint else None,
        "checkpoint_sha256": file_sha256(cfg.checkpoint) if cfg.checkpoint else None,
        "random_init": cfg.random_init,
        "steps": cfg.total_steps,
        "eval_step": cfg.eval_step,
        "dev_best": best,
        "test_acc": tests[-1][1],
        "data": {"root": str(dataset), **counts},
        "device": device,
        "s3prl_log": str(expdir / "log.log"),
        "out": str(out),
    }
    result.update(intervals(result))
    atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "result.md", result_markdown([result]))
    table = Path(cfg.table) if cfg.table else out.parent / "results.jsonl"
    append_result(table, result)
    log.info(
        "%s: dev accuracy %.2f%% (step %d; 95%% CI %s), test accuracy %.2f%% (95%% CI %s, %d clips); table %s",
        upstream["name"],
        100 * best["acc"],
        best["step"],
        interval_text(result["dev_ci95"]),
        100 * result["test_acc"],
        interval_text(result["test_ci95"]),
        counts["test_clips"],
        table.with_suffix(".md"),
    )
    run.summary.update(
        {k: result[k] for k in ("name", "upstream", "dev_best", "dev_ci95", "test_acc", "test_ci95", "steps")}
    )
    return result
