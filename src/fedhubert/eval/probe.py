"""`fedhubert probe`: a linear probe of frozen representations on keyword clips.

Each clip of a Speech Commands-layout folder goes through each frozen model once; the hidden states (the
CNN/projection output as layer 0, then every transformer layer) are mean-pooled over time, and a logistic
regression on the standardised pools (all layers concatenated, or one `layer`) is scored by speaker-disjoint
cross-validation: no speaker of a test fold is seen in training. A cheap, sensitive check of whether pretraining
made the features useful: compare a checkpoint with its randomly initialised architecture (`random_init`).
Results: `probe.json`, `probe.md`, and the log.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fedhubert.atomic import atomic_write_text
from fedhubert.audio import audio_info, speech_format_problem
from fedhubert.errors import AudioError
from fedhubert.eval.keyword_clips import KeywordClips, ProbeError, list_clips
from fedhubert.eval.probe_config import ProbeConfig
from fedhubert.manifest import file_sha256
from fedhubert.runlog import StageRun, progress

log = logging.getLogger(__name__)

Folds = list[tuple[np.ndarray, np.ndarray]]


def speaker_folds(labels: np.ndarray, speakers: np.ndarray, folds: int, seed: int) -> Folds:
    """(train, test) index pairs of `folds` folds, stratified by word where speakers allow, each speaker in the
    test part of exactly one fold and never in the training part of that fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a word rarer than `folds` only makes the stratification approximate
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        splits = list(splitter.split(np.zeros((len(labels), 1)), labels, groups=speakers))
    for train, test in splits:
        shared = set(speakers[train].tolist()) & set(speakers[test].tolist())
        if shared:
            raise ProbeError(f"fold assignment put speakers {sorted(shared)} on both sides of a fold")
    return splits


def fold_accuracies(
    features: np.ndarray, labels: np.ndarray, folds: Folds, *, c: float = 1.0, max_iter: int = 5000
) -> tuple[list[float], bool]:
    """Test accuracy per fold of a logistic regression on standardised features, and whether every fit
    converged within `max_iter`. The fits use one BLAS thread: they are small, and BLAS threads that wait for
    busy cores make them a hundred times slower."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    accuracies, converged = [], True
    for train, test in folds:
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1):
            warnings.simplefilter("always", ConvergenceWarning)
            classifier.fit(features[train], labels[train])
        converged &= not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        accuracies.append(float(classifier.score(features[test], labels[test])))
    return accuracies, converged


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU thread count set to `threads` (0: left as it is), then restored."""
    import torch

    if threads <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ProbeError(f"device '{name}' asked for, but torch sees no CUDA GPU here; use device=cpu or auto")
    return torch.device(name)


def _clip_lengths(clips: KeywordClips) -> list[int]:
    """Every clip's length from its header; unreadable clips, or clips that are not 16 kHz mono, are all named
    before any model runs."""
    lengths, bad = [], []
    for path in progress(clips.paths, desc="reading clip headers", unit="clip"):
        try:
            info = audio_info(path)
        except AudioError as error:
            bad.append(str(error))
            continue
        problem = speech_format_problem(info)
        if problem:
            bad.append(f"{path}: {problem}")
        lengths.append(info.num_samples)
    if bad:
        listed = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ProbeError(
            f"{len(bad)} of {len(clips)} clips in {clips.root} cannot be used; convert them to 16 kHz "
            f"mono (sox IN -r 16000 -c 1 OUT), or remove them:\n  {listed}"
        )
    return lengths


def _models(cfg: ProbeConfig) -> list[tuple[Path, dict, bool, str]]:
    """(checkpoint, payload, random_init, name) of every model to probe: each checkpoint, and with random_init
    one freshly initialised copy per distinct architecture, named after its first checkpoint."""
    from fedhubert.eval.frozen_features import (
        architecture_key,
        check_layer,
        default_name,
        read_payload,
        transformer_layers,
    )

    trained = [(Path(p).resolve(), read_payload(p)) for p in cfg.checkpoints]
    for path, payload in trained:
        check_layer(path, transformer_layers(payload), cfg.layer)
    names = [default_name(path) for path, _ in trained]
    if len(set(names)) < len(names):
        names = [str(path) for path, _ in trained]
    models = [(path, payload, False, name) for (path, payload), name in zip(trained, names, strict=True)]
    if cfg.random_init:
        seen = set()
        for (path, payload), name in zip(trained, names, strict=True):
            key = architecture_key(payload)
            if key not in seen:
                seen.add(key)
                models.append((path, payload, True, f"random init ({name})"))
    return models


def probe_markdown(result: dict) -> str:
    data = result["data"]
    layer = "every layer" if result["layer"] is None else f"layer {result['layer']}"
    lines = [
        f"# Linear probe on {data['root']}",
        "",
        f"{data['clips']} clips of {data['words']} words by {data['speakers']} speakers; logistic regression on "
        f"time-mean-pooled hidden states ({layer}), {result['folds']}-fold speaker-disjoint cross-validation "
        f"(accuracy: mean over folds, sd: their standard deviation). Chance (majority word): "
        f"{100 * data['chance']:.1f}%.",
        "",
        "| model | weights | architecture | features | accuracy | sd | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        weights = "random init (seed 0)" if m["random_init"] else f"`{m['checkpoint_sha256'][:12]}`"
        note = "" if m["converged"] else " (not converged)"
        lines.append(
            f"| {m['name']} | {weights} | {m['architecture']} | {m['feature_dim']} | "
            f"{100 * m['accuracy_mean']:.1f}%{note} | {100 * m['accuracy_sd']:.1f} | {m['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def run_probe(cfg: ProbeConfig, out: Path, run: StageRun) -> dict:
    from fedhubert.eval.frozen_features import frozen_model, pooled_features

    out = Path(out)
    device = _device(cfg.device)
    clips = list_clips(
        Path(cfg.dataset).resolve(), words=cfg.words, folds=cfg.folds, max_speakers=cfg.max_speakers, seed=cfg.seed
    )
    models = _models(cfg)
    folds = speaker_folds(clips.labels, clips.speakers, cfg.folds, cfg.seed)
    log.info(
        "probing %d model(s) on %d clips of %d words by %d speakers in %s (%d speaker-disjoint folds, chance %.1f%%)",
        len(models),
        len(clips),
        len(clips.words),
        clips.num_speakers,
        clips.root,
        cfg.folds,
        100 * clips.chance,
    )
    lengths = _clip_lengths(clips)
    data = {
        "root": str(clips.root),
        "clips": len(clips),
        "words": len(clips.words),
        "word_names": clips.words,
        "speakers": clips.num_speakers,
        "chance": clips.chance,
    }
    result = {
        "task": "keyword_probe",
        "layer": cfg.layer,
        "folds": cfg.folds,
        "seed": cfg.seed,
        "data": data,
        "models": [],
    }
    with torch_threads(cfg.threads):
        for path, payload, random_init, name in models:
            start = time.monotonic()
            model = frozen_model(path, payload, random_init=random_init, name=name)
            features = pooled_features(
                model, clips.paths, lengths, layer=cfg.layer, batch_size=cfg.batch_size, device=device
            )
            featurised = time.monotonic()
            accuracies, converged = fold_accuracies(features, clips.labels, folds, c=cfg.c, max_iter=cfg.max_iter)
            done = time.monotonic()
            entry = {
                "name": name,
                "kind": model.kind,
                "architecture": model.architecture,
                "checkpoint": str(path),
                "checkpoint_sha256": file_sha256(path),
                "random_init": random_init,
                "layer": "all" if cfg.layer is None else cfg.layer,
                "feature_dim": int(features.shape[1]),
                "accuracy_mean": float(np.mean(accuracies)),
                "accuracy_sd": float(np.std(accuracies, ddof=1)),
                "fold_accuracies": accuracies,
                "converged": converged,
                "clips": len(clips),
                "speakers": clips.num_speakers,
                "words": len(clips.words),
                "chance": clips.chance,
                "seconds": round(done - start, 3),
                "features_seconds": round(featurised - start, 3),
                "fit_seconds": round(done - featurised, 3),
            }
            result["models"].append(entry)
            atomic_write_text(out / "probe.json", json.dumps(result, indent=2) + "\n")
            log.info(
                "%s: probe accuracy %.1f%% (sd %.1f over %d folds; chance %.1f%%), %d features, %.1f s "
                "(features %.1f s, fits %.1f s)",
                name,
                100 * entry["accuracy_mean"],
                100 * entry["accuracy_sd"],
                cfg.folds,
                100 * clips.chance,
                entry["feature_dim"],
                entry["seconds"],
                entry["features_seconds"],
                entry["fit_seconds"],
            )
            if not converged:
                log.warning(
                    "%s: a logistic regression did not converge in max_iter=%d iterations; raise max_iter",
                    name,
                    cfg.max_iter,
                )
    atomic_write_text(out / "probe.md", probe_markdown(result))
    log.info("probe table: %s", out / "probe.md")
    accuracies = {m["name"]: {k: m[k] for k in ("accuracy_mean", "accuracy_sd")} for m in result["models"]}
    run.summary.update(data, models=accuracies)
    return result
