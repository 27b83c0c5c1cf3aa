"""Did a model learn? The verdict a stage logs and records from its held-out evaluations.

Masked accuracy and a falling training loss are both satisfied by a model that only learns how often each
cluster occurs. What such a model cannot do is beat the label-frequency baseline's cross-entropy on held-out
frames, or predict more than one or two clusters; so a run is flagged when its held-out gain over that baseline
never exceeds `MIN_GAIN_NATS`, or when its last evaluation predicts at most `MIN_CLUSTERS` distinct clusters.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

MIN_GAIN_NATS = 0.0
MIN_CLUSTERS = 2


def learning_check(evaluations: list[dict], where: str) -> dict | None:
    """The verdict from evaluation rows (in order; the first may be the untrained model, marked by `at` 0), each
    with `gain_nats` and `predicted_clusters`; None when there is none to judge. `where` names the held-out set."""
    rows = [r for r in evaluations if "gain_nats" in r]
    trained = [r for r in rows if r.get("at", 1) > 0]
    if not trained:
        return None
    best = max(trained, key=lambda r: r["gain_nats"])
    last = trained[-1]
    problems = []
    if best["gain_nats"] <= MIN_GAIN_NATS:
        problems.append(
            f"never beat the label-frequency baseline on {where} (best gain "
            f"{best['gain_nats']:+.3f} nats): it has learned at most how often each cluster occurs"
        )
    if last.get("predicted_clusters", MIN_CLUSTERS + 1) <= MIN_CLUSTERS:
        problems.append(f"predicts only {last['predicted_clusters']} distinct cluster(s) on {where}")
    return {
        "held_out": where,
        "gain_nats_first": rows[0]["gain_nats"],
        "gain_nats_last": last["gain_nats"],
        "gain_nats_best": best["gain_nats"],
        "best_at": best.get("at"),
        "predicted_clusters_last": last.get("predicted_clusters"),
        "learned": not problems,
        "problems": problems,
    }


def log_verdict(verdict: dict | None, stage: str) -> None:
    if verdict is None:
        return
    if verdict["learned"]:
        log.info(
            "%s learned: held-out gain over the label-frequency baseline %+.3f nats (best %+.3f), %s clusters "
            "predicted",
            stage,
            verdict["gain_nats_last"],
            verdict["gain_nats_best"],
            verdict["predicted_clusters_last"],
        )
    else:
        for problem in verdict["problems"]:
            log.warning("%s: the model %s", stage, problem)
