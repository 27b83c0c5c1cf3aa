"""Why the learning benchmark's probe and held-out gain disagree for non-IID clients (issue 28): is it the encoder
or the shared label head?

One speaker per client probes well above random init, yet its held-out masked prediction is below the
label-frequency baseline in every seed. The probe reads the frozen encoder; the held-out gain reads the encoder and the
averaged label head (final projection and label embeddings) together. This separates them. For each of the learning
benchmark's final checkpoints (results/learning/<run>-seed<k>.json; centralized, FedAvg IID, Dirichlet(sex) and one
speaker per client, every seed; and random init) on its own partition's dev-clean and codebook labels:

- the held-out masked gain the benchmark measured (its cell's `gain_last`: masked frames, as in training);
- the model's own head on unmasked input: cross-entropy of its K-way cosine logits against the frames' labels;
- a refitted head: multinomial logistic regression from the last layer's frames to their labels, fitted on one half
  of dev-clean's speakers and scored on the other (2 speaker-disjoint folds, both ways);

each as a gain over the label-frequency baseline of the fitting half (nats per frame; positive: better than guessing
the frequent labels). And per partition, how far dev-clean's label frequencies are from the training labels' (the
benchmark's baseline): the gain that predicting dev-clean's own frequencies, with no context, would score over it.
If the refitted head recovers a gain close to IID's where the own head is below the baseline, the encoder learned
and the averaged head is what fails.

    python benchmarks/head_refit.py        # after benchmarks/learning.py, on its checkpoints
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from _common import write_results
from fedhubert.audio import read_audio
from fedhubert.eval.frozen_features import frozen_model, read_payload
from fedhubert.model.checkpoint import model_config_of
from fedhubert.train.data import LabelRate, read_labelled
from fedhubert.train.loop import label_log_prior
from learning import RUNS, add_arguments, cells_of, make_data, variant

RUN_SLUGS = ("fedavg-iid", "dirichlet-sex", "one-speaker")
SEEDS = 3
FOLDS = 2
MAX_ITER = 300


def speaker(path) -> str:
    return path.name.split("-")[0]


def frames_of(checkpoint, manifest, labels, random_init: bool = False) -> tuple[np.ndarray, ...]:
    """The last layer's frames of every dev-clean utterance, their labels (frame t takes label 2t of the 100 Hz MFCC
    labels) and the model's own head's log-probabilities over the K classes."""
    payload = read_payload(checkpoint)
    model = frozen_model(checkpoint, payload, random_init=random_init, name="refit")
    cfg, k = model_config_of(payload), payload["num_classes"]
    head = model.module.logit_generator
    features, targets, own, speakers = [], [], [], []
    rate = LabelRate(100, cfg)
    with torch.no_grad():
        for utterance in read_labelled(manifest, labels, k, rate):
            wave = torch.from_numpy(read_audio(utterance.path))[None]
            last = model.hidden_states(wave)[-1][0]
            y = torch.from_numpy(utterance.labels[:: rate.step].astype(np.int64))
            n = min(len(last), len(y))
            last, y = last[:n], y[:n]
            sims = F.normalize(head.final_proj(last), dim=-1) @ F.normalize(head.label_embeddings, dim=-1).T
            own.append(F.log_softmax(sims / head.temperature, dim=-1).gather(1, y[:, None])[:, 0].numpy())
            features.append(last.numpy())
            targets.append(y.numpy())
            speakers += [speaker(utterance.path)] * n
    return np.concatenate(features), np.concatenate(targets), np.concatenate(own), np.array(speakers)


def read_labels(path) -> np.ndarray:
    return np.concatenate([np.array(line.split(), dtype=np.int64) for line in path.read_text().splitlines()])


def prior_shift(kmeans) -> dict:
    """How far dev-clean's label frequencies are from the training labels' (the benchmark's baseline, pooled over
    the clients): the gain over that baseline that predicting dev-clean's own frequencies would score, with no
    context at all (cross-entropy of dev-clean's labels under the training frequencies minus their entropy)."""
    k = int(json.loads((kmeans / "kmeans.json").read_text())["num_clusters"])
    train = np.concatenate([read_labels(f) for f in sorted(kmeans.glob("client_*/train.km"))])
    dev = read_labels(kmeans / "global" / "dev-clean.km")
    log_prior = label_log_prior(np.bincount(train, minlength=k)).double().numpy()
    freq = np.bincount(dev, minlength=k) / len(dev)
    seen = freq > 0
    entropy = float(-(freq[seen] * np.log(freq[seen])).sum())
    return {
        "dev_frames": int(len(dev)),
        "cross_entropy_under_training_prior": float(-(freq * log_prior).sum()),
        "dev_entropy": entropy,
        "free_gain_nats": float(-(freq * log_prior).sum()) - entropy,
        "top_dev_label_share": float(freq.max()),
    }


def baseline_ce(train_y: np.ndarray, test_y: np.ndarray, k: int) -> float:
    """Cross-entropy of the training half's label frequencies (the training loop's add-one smoothed baseline) on the
    scored half."""
    return float(-label_log_prior(np.bincount(train_y, minlength=k)).double().numpy()[test_y].mean())


def measure(checkpoint, manifest, labels, random_init: bool = False) -> dict:
    x, y, own_logp, speakers = frames_of(checkpoint, manifest, labels, random_init)
    k = int(read_payload(checkpoint)["num_classes"])
    names = sorted(set(speakers))
    fold_of = {s: i % FOLDS for i, s in enumerate(names)}
    fold = np.array([fold_of[s] for s in speakers])
    own_gains, refit_gains = [], []
    for held in range(FOLDS):
        train, test = fold != held, fold == held
        base = baseline_ce(y[train], y[test], k)
        own_gains.append(base - float(-np.mean(own_logp[test])))
        scaler = StandardScaler().fit(x[train])
        with warnings.catch_warnings():  # lbfgs may stop at max_iter before its tolerance: a fixed budget
            warnings.simplefilter("ignore")
            classifier = LogisticRegression(max_iter=MAX_ITER).fit(scaler.transform(x[train]), y[train])
        proba = classifier.predict_proba(scaler.transform(x[test]))
        column = {c: i for i, c in enumerate(classifier.classes_)}
        floor = 1e-6  # a class the fitting half never saw
        p = np.array([proba[i, column[c]] if c in column else floor for i, c in enumerate(y[test])])
        refit_gains.append(base - float(-np.mean(np.log(np.maximum(p, floor)))))
    return {
        "checkpoint": str(checkpoint),
        "frames": int(len(y)),
        "speakers": len(names),
        "own_head_gain": float(np.mean(own_gains)),
        "refit_head_gain": float(np.mean(refit_gains)),
        "own_head_gain_by_fold": own_gains,
        "refit_head_gain_by_fold": refit_gains,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    data = make_data(args)
    partition_of = {run.slug: run.partition for run in RUNS}
    results: dict[str, list[dict]] = {}
    shifts = {
        part: prior_shift(data["labels"][part, "federated"]) for part in sorted({partition_of[s] for s in RUN_SLUGS})
    }
    for part, shift in shifts.items():
        print(
            f"head_refit: {part}: dev-clean's own label frequencies gain {shift['free_gain_nats']:.3f} nats", flush=True
        )
    for slug in RUN_SLUGS:
        part = partition_of[slug]
        manifest = data["partitions"][part] / "global" / "dev-clean.tsv"
        labels = data["labels"][part, "federated"] / "global" / "dev-clean.km"
        for seed in range(SEEDS):
            cell = cells_of(args) / f"{slug}-seed{seed}.json"
            if not cell.is_file():
                print(f"head_refit: {cell} missing, {slug} seed {seed} left out", flush=True)
                continue
            record = json.loads(cell.read_text())["record"]
            result = {
                "seed": seed,
                "git_commit": record.get("git_commit"),
                "masked_gain_in_benchmark": record.get("gain_last"),
                **measure(record["checkpoint"], manifest, labels),
            }
            results.setdefault(slug, []).append(result)
            print(
                f"head_refit: {slug} seed {seed}: own {result['own_head_gain']:+.3f}, refit "
                f"{result['refit_head_gain']:+.3f} nats",
                flush=True,
            )
    first = json.loads((cells_of(args) / "fedavg-iid-seed0.json").read_text())["record"]["checkpoint"]
    iid = data["partitions"]["iid"] / "global" / "dev-clean.tsv"
    iid_labels = data["labels"]["iid", "federated"] / "global" / "dev-clean.km"
    results["random-init"] = [{"seed": 0, **measure(first, iid, iid_labels, random_init=True)}]
    figures = [
        {
            "figure": f"{part}: dev-clean's own label frequencies, gain",
            "ours": f"{v['free_gain_nats']:+.3f}",
            "unit": "nats",
        }
        for part, v in shifts.items()
    ]
    for slug, rows in results.items():
        measured = (
            ("masked_gain_in_benchmark", "masked, own head"),
            ("own_head_gain", "unmasked, own head"),
            ("refit_head_gain", "unmasked, refitted head"),
        )
        for key, what in measured:
            values = [r[key] for r in rows if r.get(key) is not None]
            if not values:
                continue
            se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
            figures.append(
                {
                    "figure": f"{slug}: {what} gain",
                    "ours": f"{statistics.fmean(values):+.3f} +- {se or 0:.3f}",
                    "unit": "nats",
                }
            )
    write_results(
        "head_refit" + variant(args),
        figures,
        notes=(
            "learning benchmark's final checkpoints, dev-clean of each run's partition with its federated codebook; "
            f"gains over the label-frequency baseline, last layer; refit: logistic regression ({MAX_ITER} lbfgs "
            f"steps), "
            f"{FOLDS} speaker-disjoint folds; mean +- SE over seeds"
        ),
        extra={"runs": results, "prior_shift": shifts, "seconds": round(time.perf_counter() - started, 1)},
    )


if __name__ == "__main__":
    main()
