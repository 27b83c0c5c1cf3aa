"""Training that learns with its defaults, and metrics that a frequency-counting model cannot satisfy: the fitted
learning-rate schedule, the label-frequency baseline beside the masked cross-entropy, the learning verdict, the
server's step against its clients' mean change, and bfloat16 transfer of changes rather than weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common import PRETRAIN_FAST, SMALL_K, rows, run_cli
from fedhubert.config import load_config
from fedhubert.fl.config import StrategyConfig
from fedhubert.fl.local import planned_local_steps
from fedhubert.fl.server_step import MIN_COSINE, STEP_RATIO_RANGE, WATCH_ROUNDS, StepWatch, server_step
from fedhubert.fl.strategy import make_strategy
from fedhubert.model.checkpoint import load_checkpoint
from fedhubert.model.config import ModelConfig
from fedhubert.model.hubert import build_hubert, cosine_logits
from fedhubert.pretrain.config import PretrainConfig
from fedhubert.train.config import LossConfig, OptimConfig, TrainConfig
from fedhubert.train.data import LabelRate, batch_loader, label_counts, load_utterances
from fedhubert.train.learning import learning_check
from fedhubert.train.loop import (
    MaskedPrediction,
    TrainingError,
    evaluate,
    hubert_loss,
    label_log_prior,
    label_scores,
    learning_rate,
)
from fedhubert.train.schedule import fit_schedule, schedule_record, schedule_warnings

TINY = load_config(ModelConfig, None, ["preset=tiny"])


# ---------------------------------------------------------------------------------------------- the schedule
def test_an_unset_schedule_is_fitted_to_the_planned_updates():
    fitted = fit_schedule(OptimConfig(lr=1e-3), 200, default_lr=5.0)
    assert (fitted.warmup_steps, fitted.total_steps) == (20, 200)
    assert learning_rate(19, fitted) == pytest.approx(1e-3) and learning_rate(199, fitted) > 0
    assert learning_rate(200, fitted) == 0
    assert schedule_warnings(OptimConfig(), 200) == []
    record = schedule_record(OptimConfig(warmup_fraction=0.05), 1000, default_lr=2e-3)
    assert record["warmup_steps"] == 50 and record["total_from"] == "planned updates"
    assert record["lr"] == 2e-3 and record["lr_from"] == "model preset"


def test_explicit_values_are_honoured_and_a_schedule_that_does_not_fit_is_named():
    recipe = OptimConfig(lr=5e-4, warmup_steps=32000, total_steps=250000)
    assert fit_schedule(recipe, 500, default_lr=1.0) == recipe
    [problem] = schedule_warnings(recipe, 500)
    assert "never reaches its peak" in problem and "1.6% of optim.lr" in problem
    [problem] = schedule_warnings(OptimConfig(warmup_steps=10, total_steps=300), 500)
    assert "reaches 0 at update 300" in problem and "the last 200 change nothing" in problem


def test_an_unresolved_schedule_is_an_error_not_a_silent_rate():
    with pytest.raises(TrainingError, match="not resolved"):
        learning_rate(0, OptimConfig(lr=1e-3))
    with pytest.raises(TrainingError, match="not resolved"):
        learning_rate(0, OptimConfig(warmup_steps=1, total_steps=10))


def test_the_planned_local_steps_include_a_larger_client_override(tmp_path):
    (tmp_path / "client_configs").mkdir()
    (tmp_path / "client_configs" / "client_1.yaml").write_text("local_steps: 7\n")
    cfg = load_config(PretrainConfig, None, [f"partition={tmp_path}", "kmeans=/k", "local_steps=3"])
    assert planned_local_steps(cfg, 3) == 7


def test_a_client_override_file_is_one_more_config_layer(tmp_path):
    from fedhubert.errors import ConfigError
    from fedhubert.fl.local import ClientPlace, with_client_overrides

    (tmp_path / "client_configs").mkdir()
    cfg = load_config(PretrainConfig, None, [f"partition={tmp_path}", "kmeans=/k", "train.optim.lr=0.01"])
    place = ClientPlace(0, tmp_path, None, tmp_path)
    assert with_client_overrides(cfg, place) == cfg, "no file: the run's config"
    path = tmp_path / "client_configs" / "client_0.yaml"
    path.write_text("# what the partitioner writes for every client\n{}\n")
    assert with_client_overrides(cfg, place) is cfg, "an empty override file: the run's config, not rebuilt"
    path.write_text("train:\n  device: cpu\n  data:\n    batch_seconds: 30\n")
    mine = with_client_overrides(cfg, place)
    assert (mine.train.device, mine.train.data.batch_seconds, mine.train.optim.lr) == ("cpu", 30.0, 0.01)
    assert mine.train.data.max_seconds == cfg.train.data.max_seconds and mine.model == cfg.model
    path.write_text("seed: 3\nlocal_steps: 0\ntrain:\n  devise: cpu\n")
    with pytest.raises(ConfigError) as err:
        with_client_overrides(cfg, place)
    message = str(err.value)
    assert message.startswith("3 config mistakes:")
    assert f"{path}: key 'seed' cannot be set in this file (it may set local_steps, train)" in message
    assert f"{path}: unknown key 'train.devise' (did you mean 'device'?)" in message
    assert f"{path}: key 'local_steps' must be >= 1, got 0" in message


# -------------------------------------------------------------------------------------- metrics and baseline
def test_label_scores_recover_each_frames_label_and_class_scores():
    torch.manual_seed(0)
    x, emb = torch.randn(50, 8), torch.randn(12, 8)
    labels = torch.randint(0, 12, (50,))
    logits = cosine_logits(x, labels, emb, 0.1)
    found, scores = label_scores(logits)
    expected = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).T / 0.1
    assert torch.equal(found, labels) and torch.allclose(scores, expected, atol=1e-5)


def test_the_baseline_is_the_cross_entropy_of_the_training_label_distribution():
    counts = np.array([6, 3, 1, 0])
    prior = label_log_prior(counts)
    assert torch.allclose(prior.exp(), torch.tensor([7, 4, 2, 1]) / 14.0)
    torch.manual_seed(1)
    labels = torch.tensor([0, 0, 1, 3, 2])
    logits = cosine_logits(torch.randn(5, 8), labels, torch.randn(4, 8), 0.1)
    out = hubert_loss(logits, logits[:0], torch.zeros(()), LossConfig(feature_penalty=0), prior)
    assert out.sums["prior_ce_m"] == pytest.approx(float(-prior[labels].sum()), rel=1e-6)
    assert out.sums["ce_m"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, torch.zeros(5, dtype=torch.long), reduction="sum")), rel=1e-6
    )
    assert out.sums["predicted"].sum() == 5


@pytest.fixture(scope="module")
def held_out(small_partition, small_labels):
    rate = LabelRate(100, TINY)
    data = load_config(TrainConfig, None, ["data.min_seconds=1", "data.max_seconds=3", "data.batch_seconds=12"]).data
    train = load_utterances(
        [(small_partition / f"client_{i}" / "train.tsv", small_labels / f"client_{i}" / "train.km") for i in range(3)],
        SMALL_K,
        data,
        rate,
    )
    valid = load_utterances(
        [(small_partition / f"client_{i}" / "valid.tsv", small_labels / f"client_{i}" / "valid.km") for i in range(3)],
        SMALL_K,
        data,
        rate,
    )
    return label_counts(train, SMALL_K), batch_loader(valid, rate, data, 1, None)


def test_a_frequency_only_model_is_flagged(held_out):
    """A model whose every frame projects to one vector predicts one cluster whatever it hears: at best it can know
    how often clusters occur. Its held-out evaluation says so, and the verdict flags it."""
    counts, loader = held_out
    torch.manual_seed(0)
    model = build_hubert(TINY, SMALL_K)
    with torch.no_grad():
        model.logit_generator.final_proj.weight.zero_()
        model.logit_generator.final_proj.bias.normal_()
    objective = MaskedPrediction(LossConfig(), log_prior=label_log_prior(counts))
    result = evaluate(model, loader, TrainConfig(), objective=objective, device=torch.device("cpu"))
    assert result["predicted_clusters"] == 1 and result["prediction_entropy"] == pytest.approx(0.0)
    assert result["gain_nats"] < 0 and math.isfinite(result["baseline_ce_masked"])
    verdict = learning_check([{"at": 0, **result}, {"at": 1, **result}], "dev")
    assert not verdict["learned"]
    assert any("never beat the label-frequency baseline" in p for p in verdict["problems"])
    assert any("predicts only 1 distinct cluster" in p for p in verdict["problems"])


@pytest.mark.slow  # trains (or composes) for a minute: make test, not make test-quick
def test_a_briefly_trained_tiny_model_beats_the_frequency_baseline_on_held_out_frames(
    small_partition, small_labels, tmp_path
):
    out = tmp_path / "central"
    manifests = [str(small_partition / f"client_{i}" / "train.tsv") for i in range(3)]
    labels = [str(small_labels / f"client_{i}" / "train.km") for i in range(3)]
    valid = [str(small_partition / f"client_{i}" / "valid.tsv") for i in range(3)]
    valid_labels = [str(small_labels / f"client_{i}" / "valid.km") for i in range(3)]
    assert (
        run_cli(
            "train-local",
            "--out",
            out,
            "--preset",
            "tiny",
            "--steps",
            "50",
            f"num_classes={SMALL_K}",
            f"train_manifests={manifests}",
            f"train_labels={labels}",
            f"valid_manifests={valid}",
            f"valid_labels={valid_labels}",
            "eval_every=25",
            "checkpoint_every=50",
            "train.device=cpu",
            "train.data.min_seconds=1",
            "train.data.max_seconds=3",
            "train.data.batch_seconds=12",
        )
        == 0
    )
    summary = json.loads((out / "run.json").read_text())["summary"]
    assert summary["schedule"]["total_steps"] == 50 and summary["schedule"]["warmup_steps"] == 5
    assert summary["schedule"]["lr"] == 5e-3 and summary["schedule"]["lr_from"] == "model preset"
    assert summary["valid_last"]["gain_nats"] > 0, summary["valid_last"]
    assert summary["valid_last"]["predicted_clusters"] > 2
    assert summary["learning"]["learned"], summary["learning"]


# -------------------------------------------------------------------------------------------- the server step
def test_the_server_step_is_compared_with_the_clients_mean_change():
    sent = {"w": torch.zeros(4)}
    mean_change = {"w": torch.tensor([0.25, 0.75, 0, 0])}
    fedavg = {"w": torch.tensor([0.25, 0.75, 0, 0])}
    stats = server_step(sent, fedavg, mean_change)
    assert stats["step_ratio"] == pytest.approx(1.0) and stats["step_cosine"] == pytest.approx(1.0)
    doubled = server_step(sent, {"w": torch.tensor([0.5, 1.5, 0, 0])}, mean_change)
    assert doubled["step_ratio"] == pytest.approx(2.0) and doubled["step_cosine"] == pytest.approx(1.0)
    sideways = server_step(sent, {"w": torch.tensor([0.0, 0, 0.1, 0])}, mean_change)
    assert sideways["step_cosine"] == pytest.approx(0.0)
    assert sideways["step_ratio"] == pytest.approx(0.1 / math.hypot(0.25, 0.75))


def test_a_server_step_far_from_the_clients_change_is_named_once_with_the_fix():
    low, high = STEP_RATIO_RANGE
    timid = StepWatch("fedadam", 1e-4, 1e-3, beta_1=0.0)
    said = [timid.add(ratio, 0.97) for ratio in [0.05, 0.04, 0.06, 0.05, 0.05]]
    assert said[: WATCH_ROUNDS - 1] == [None] * (WATCH_ROUNDS - 1) and said[WATCH_ROUNDS:] == [None, None]
    warning = said[WATCH_ROUNDS - 1]
    assert "strategy.eta=0.0001, strategy.tau=0.001, strategy.beta_1=0" in warning
    assert "moved the model by 5% of the clients' mean change" in warning and "raise strategy.eta" in warning
    assert "turned" not in warning
    wild = StepWatch("fedavgm", 3.0, None)
    warning = [wild.add(r, c) for r, c in [(9.0, 0.5), (8.0, 0.4), (12.0, 0.6)]][-1]
    assert warning.startswith("fedavgm with strategy.eta=3, median over 3 rounds: moved the model by 900%")
    assert "lower strategy.eta" in warning and "cosine 0.50" in warning and "lower strategy.momentum" in warning
    momentum = StepWatch("fedadam", 1e-2, 1e-3, beta_1=0.9)
    warning = [momentum.add(1.0, c) for c in (0.5, 0.6, 0.55)][-1]
    assert "moved" not in warning and "lower strategy.beta_1 (0: no server momentum)" in warning
    normalised = StepWatch("fedadam", 1e-2, 1e-3, beta_1=0.0)
    warning = [normalised.add(1.0, 0.5) for _ in range(WATCH_ROUNDS)][-1]
    assert "raise strategy.tau" in warning and "beta_1 (" not in warning
    following = StepWatch("fedyogi", 1e-2, 1e-2, beta_1=0.0)
    assert [following.add(r, MIN_COSINE) for r in [low, 1.0, high]] == [None, None, None]
    fedavg = StepWatch("fedavg", 1.0, None)
    assert [fedavg.add(r, 0.0) for r in [0.0, 0.0, 0.0]] == [None, None, None]


@pytest.mark.slow
def test_fedadam_with_its_defaults_learns_and_follows_its_clients(small_partition, small_kmeans, tmp_path):
    """`strategy.name=fedadam` alone (its preset, the clients' preset rate) at tiny size: the held-out gain over
    the label-frequency baseline ends above 0 with more than 2 clusters predicted (the bar the centralized tiny
    test sets), the run's learning verdict is positive, and the server's step stays within STEP_RATIO_RANGE of the
    clients' mean change (no warning)."""
    out = tmp_path / "fedadam"
    fast = [a for a in PRETRAIN_FAST if not a.startswith("train.optim.lr")]
    fast[fast.index("--local-steps") + 1] = "10"
    args = ["--partition", small_partition, "--kmeans", small_kmeans, "--out", out, *fast, "--rounds", "8"]
    assert run_cli("pretrain", *args, "strategy.name=fedadam") == 0
    saved = load_checkpoint(out / "checkpoints" / "final.pt")["state"]
    assert saved["config"]["strategy"]["beta_1"] is None and saved["config"]["strategy"]["eta"] is None
    last = rows(out, "eval")[-1]
    assert last["gain_nats"] > 0 and last["predicted_clusters"] > 2, last
    assert json.loads((out / "run.json").read_text())["summary"]["learning"]["learned"]
    ratios = [r["step_ratio"] for r in rows(out, "train")]
    low, high = STEP_RATIO_RANGE
    assert low <= sorted(ratios)[len(ratios) // 2] <= high, ratios
    assert "moved the model by" not in (out / "logs" / "server-pretrain.log").read_text()


def test_a_strategy_state_saved_before_the_first_aggregation_loads():
    """round_00000.pt, written when round 1 fails, holds a FedAdam state without moments."""
    strategy = make_strategy(StrategyConfig(name="fedadam"))
    saved = {"name": "fedadam", **strategy.state()}
    fresh = make_strategy(StrategyConfig(name="fedadam"))
    fresh.load_state(saved)
    assert fresh.m_t is None


# ------------------------------------------------------------------------------------------ federated, on Flower
def pretrain(partition: Path, kmeans: Path, out: Path, *args: str) -> int:
    return run_cli("pretrain", "--partition", partition, "--kmeans", kmeans, "--out", out, *PRETRAIN_FAST, *args)


@pytest.mark.slow
def test_bfloat16_sends_changes_that_match_the_float32_round(small_partition, small_kmeans, tmp_path):
    """With a tiny learning rate every weight changes by less than bfloat16 can resolve in a weight; sending the
    change instead keeps the round's aggregated change that of the float32 round."""
    changes = {}
    for transfer in ("float32", "bfloat16"):
        out = tmp_path / transfer
        assert (
            pretrain(
                small_partition,
                small_kmeans,
                out,
                "--rounds",
                "1",
                f"transfer={transfer}",
                "strategy.name=fedavg",
                "train.optim.lr=1e-6",
            )
            == 0
        )
        final = load_checkpoint(out / "checkpoints" / "final.pt")["state_dict"]
        torch.manual_seed(0)
        initial = build_hubert(TINY, 16).state_dict()
        changes[transfer] = torch.cat([(final[k] - initial[k]).flatten() for k in initial])
        [train] = rows(out, "train")
        assert train["step_ratio"] == pytest.approx(1.0, abs=1e-3)
        assert train["step_cosine"] == pytest.approx(1.0, abs=1e-3)
    a, b = changes["float32"], changes["bfloat16"]
    assert a.norm() > 0
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) >= 0.99


@pytest.mark.slow
def test_the_global_step_follows_the_longest_client_and_the_schedule_plans_for_it(
    small_partition, small_kmeans, tmp_path
):
    """A client_configs override of local_steps: the round advances the global step by the updates actually run,
    and the fitted schedule counts them (not the config's local_steps). In the same run, client 2's validation split
    holds only an utterance shorter than its (overridden) min_seconds, as a one-speaker client's often does: it still
    trains, says it skipped validation, and the round counts it; and the server evaluates a bounded sample of
    dev-clean (eval_seconds), recording its seconds and audio per evaluation and the sample in run.json."""
    import shutil

    from fedhubert.manifest import read_manifest

    partition, kmeans = tmp_path / "partition", tmp_path / "kmeans"
    shutil.copytree(small_partition, partition)
    shutil.copytree(small_kmeans, kmeans, ignore=shutil.ignore_patterns("flwr", "features"))
    record = json.loads((kmeans / "kmeans.json").read_text())
    record["partition"]["path"] = str(partition)
    (kmeans / "kmeans.json").write_text(json.dumps(record))
    (partition / "client_configs").mkdir(exist_ok=True)
    (partition / "client_configs" / "client_1.yaml").write_text("local_steps: 5\n")
    valid_tsv, valid_km = partition / "client_2" / "valid.tsv", kmeans / "client_2" / "valid.km"
    entries, labels = valid_tsv.read_text().splitlines(), valid_km.read_text().splitlines()
    lengths = [e.num_samples for e in read_manifest(valid_tsv).entries]
    shortest = int(np.argmin(lengths))
    valid_tsv.write_text(f"{entries[0]}\n{entries[1 + shortest]}\n")
    valid_km.write_text(labels[shortest] + "\n")
    min_seconds = lengths[shortest] / 16000 + 0.05
    assert sum(
        e.num_samples / 16000 >= min_seconds for e in read_manifest(partition / "client_2" / "train.tsv").entries
    )
    (partition / "client_configs" / "client_2.yaml").write_text(f"train: {{data: {{min_seconds: {min_seconds}}}}}\n")
    out = tmp_path / "run"
    assert pretrain(partition, kmeans, out, "--rounds", "2", "eval_seconds=8") == 0
    assert [r["global_step"] for r in rows(out, "train")] == [5, 10]
    assert {r["client"]: r["train_steps"] for r in rows(out, "client") if r["round"] == 1} == {0: 3, 1: 5, 2: 3}
    summary = json.loads((out / "run.json").read_text())["summary"]
    assert summary["schedule"]["planned_updates"] == 10 and summary["schedule"]["total_steps"] == 10
    assert rows(out, "failure") == []
    assert [(r["clients"], r["valid_skipped"]) for r in rows(out, "train")] == [(3, 1), (3, 1)]
    for row in rows(out, "client"):
        skipped = row["client"] == 2
        assert row.get("valid_skipped", 0) == int(skipped) and ("valid_gain_nats" in row) != skipped, row
    clients = rows(out, "client")
    for train in rows(out, "train"):  # validation means are over the clients that validated
        validated = [r for r in clients if r["round"] == train["round"] and "valid_loss" in r]
        weights = np.array([r["num-examples"] for r in validated])
        mean = float(np.dot(weights, [r["valid_loss"] for r in validated]) / weights.sum())
        assert len(validated) == 2 and train["valid_loss"] == pytest.approx(mean, rel=1e-5)
    sample = summary["evaluation"]
    assert sample["subset"] == "dev-clean" and sample["budget_seconds"] == 8
    assert 0 < sample["seconds"] <= 8 < sample["of_seconds"] and 1 <= sample["speakers"] <= sample["of_speakers"]
    evals = rows(out, "eval")
    assert [r["round"] for r in evals] == [0, 1, 2]
    assert all(r["eval_s"] > 0 and 0 < r["eval_audio_s"] <= sample["seconds"] for r in evals)
    assert len({r["eval_audio_s"] for r in evals}) == 1, "the same crops at every evaluation"


@pytest.mark.slow
def test_resume_with_nothing_readable_is_an_error_unless_forced(small_partition, small_kmeans, tmp_path, capsys):
    from fedhubert.config import absolute_paths, save_config

    out = tmp_path / "nothing-saved"
    out.mkdir()
    save_config(
        absolute_paths(
            load_config(
                PretrainConfig,
                None,
                [
                    f"partition={small_partition}",
                    f"kmeans={small_kmeans}",
                    "num_rounds=1",
                    *[a for a in PRETRAIN_FAST if "=" in a],
                    "model.preset=tiny",
                    "local_steps=2",
                ],
            )
        ),
        out / "config.yaml",
    )
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "round_00001.pt").write_bytes(b"not a checkpoint")
    assert run_cli("pretrain", "--resume", out) == 2
    err = capsys.readouterr().err
    assert f"no readable checkpoint in {out / 'checkpoints'}" in err and "--force" in err
    assert run_cli("pretrain", "--resume", out, "--force") == 0
    assert load_checkpoint(out / "checkpoints" / "final.pt")["state"]["round"] == 1
