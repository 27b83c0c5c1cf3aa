"""Client-level differential privacy (mode server): the accountant against dp-accounting computed directly and
against the exact Gaussian mechanism, clipping and noise, settings refused before a run, and real Flower runs that
clip, account every round, stop at the target epsilon and resume exactly."""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.serverapp import RdpAccountant
from scipy.stats import norm

from common import PRETRAIN_FAST, rows, run_cli
from fedhubert.config import load_config
from fedhubert.errors import ConfigError
from fedhubert.fl.config import PrivacyConfig
from fedhubert.fl.privacy import (
    Accountant,
    ClipBound,
    check_settings,
    clip_per_layer,
    clip_update,
    noise_for_target,
    noise_share,
    privatise_change,
    update_noise_multiplier,
    update_norm,
)
from fedhubert.model.checkpoint import load_checkpoint
from fedhubert.pretrain.config import OUTPUTS as PRETRAIN_OUTPUTS
from fedhubert.report import write_report
from fedhubert.runlog import CONFIG_FILE, LOG_DIR, RUN_FILE


def privacy(**keys: object) -> PrivacyConfig:
    return load_config(PrivacyConfig, None, ["mode=server", *(f"{k}={v}" for k, v in keys.items())])


def reference_epsilon(noise: float, rounds: int, delta: float, population: int, sampled: int) -> float:
    """dp-accounting's RDP accountant, called directly: all clients each round (add/remove one, sensitivity C), or
    a fixed-size sample without replacement (replace-one, sensitivity 2C, so half the noise multiplier)."""
    if sampled == population:
        accountant = dp_accounting.rdp.RdpAccountant()
        event = dp_accounting.GaussianDpEvent(noise)
    else:
        accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            population, sampled, dp_accounting.GaussianDpEvent(noise / 2)
        )
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


def exact_gaussian_delta(epsilon: float, sigma: float) -> float:
    """delta(epsilon) of the Gaussian mechanism with sensitivity 1 and noise sigma, exactly (Balle and Wang 2018,
    Theorem 8)."""
    return norm.cdf(-epsilon * sigma + 1 / (2 * sigma)) - math.exp(epsilon) * norm.cdf(
        -epsilon * sigma - 1 / (2 * sigma)
    )


@pytest.mark.parametrize(("population", "sampled"), [(10, 10), (100, 10)])
def test_the_accountant_matches_dp_accounting(population, sampled):
    accountant = Accountant(privacy(clip_norm=1.0, noise_multiplier=1.1, delta=1e-5), population, sampled)
    epsilons = [accountant.spend_round() for _ in range(20)]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    assert epsilons[-1] == pytest.approx(reference_epsilon(1.1, 20, 1e-5, population, sampled), rel=1e-9)


def test_without_sampling_the_bound_is_close_to_the_exact_gaussian_mechanism():
    """T rounds of noise z compose to one Gaussian mechanism of noise z / sqrt(T); RDP must bound its exact epsilon
    from above, and not by much."""
    noise, rounds, delta = 2.0, 16, 1e-5
    accountant = Accountant(privacy(clip_norm=1.0, noise_multiplier=noise, delta=delta), 50, 50)
    for _ in range(rounds):
        epsilon = accountant.spend_round()
    sigma = noise / math.sqrt(rounds)
    low, high = 0.0, 50.0
    for _ in range(100):  # the exact epsilon at delta, by bisection
        middle = (low + high) / 2
        low, high = (middle, high) if exact_gaussian_delta(middle, sigma) > delta else (low, middle)
    assert high <= epsilon <= 1.3 * high


def test_a_resumed_accountant_continues_exactly():
    settings = privacy(clip_norm=1.0, noise_multiplier=0.8, delta=1e-5, target_epsilon=30)
    first = Accountant(settings, 20, 5)
    for _ in range(3):
        first.spend_round()
    second = Accountant(settings, 20, 5)
    second.load_state(json.loads(json.dumps(first.state())))
    assert (second.spend_round(), second.rounds) == (first.spend_round(), first.rounds)


@pytest.mark.slow  # trains (or composes) for a minute: make test, not make test-quick
def test_the_accountant_keeps_running_totals_that_equal_a_replay():
    """The spent total and the one-round-ahead total, which the accountant adds to round by round (its cost per
    round is measured in benchmarks/growth.py, not here), give what Flower's RdpAccountant gives by replaying every
    round (rounds with fewer noise shares included), and a saved ledger (or Flower's own saved state, from earlier
    versions) resumes to the same epsilon. 12 rounds: two short rounds between runs of full ones."""
    settings = privacy(clip_norm=1.0, noise_multiplier=0.9, delta=1e-5, target_epsilon=40.0)
    ours = Accountant(settings, 200, 20)
    replay = RdpAccountant(ours.config)
    for round_ in range(12):
        shares = 17 if round_ % 7 == 3 else None
        ours.spend_round(shares)
        replay.compose(ours._event(1.0 if shares is None else math.sqrt(shares / 20)))
        assert ours.epsilon() == pytest.approx(replay.get_privacy_spent().epsilon, rel=1e-12)
        assert ours.next_round_exceeds() == replay.would_exceed(ours.event)
    assert ours.rounds == 12 and len(ours.ledger) == 5, "runs of equal rounds are merged"
    for saved in (ours.state(), replay.state_dict()):
        resumed = Accountant(settings, 200, 20)
        resumed.load_state(json.loads(json.dumps(saved)))
        assert (resumed.rounds, resumed.epsilon()) == (12, pytest.approx(ours.epsilon(), rel=1e-12))
    with pytest.raises(ConfigError, match="same clients available"):
        Accountant(settings, 199, 20).load_state(ours.state())


def test_missing_noise_shares_are_accounted_as_less_noise():
    """Mode client: 2 of 3 sampled clients reply, so the sum carries 2 noise shares, noise z sqrt(2/3)."""
    full = Accountant(privacy(clip_norm=1.0, noise_multiplier=1.2, delta=1e-5), 3, 3)
    short = Accountant(privacy(clip_norm=1.0, noise_multiplier=1.2, delta=1e-5), 3, 3)
    assert short.spend_round(2) > full.spend_round(3)
    assert short.epsilon() == pytest.approx(reference_epsilon(1.2 * math.sqrt(2 / 3), 1, 1e-5, 3, 3), rel=1e-9)


@pytest.mark.parametrize("start", [0.01, 1.0, 100.0])
def test_the_adaptive_bound_settles_at_the_target_quantile(start):
    """Without noise on the count, the geometric rule of Andrew et al. settles near the target quantile of the
    norms, from far below or above."""
    rng = np.random.default_rng(0)
    bound = ClipBound(privacy(clip_norm=start, adaptive_clipping="true", target_quantile=0.7), 10)
    for round_ in range(400):
        norms = rng.lognormal(0.0, 0.5, size=10)
        bound.update(list(norms > bound.value), seed=0, round_=round_)
    quantile = float(np.exp(0.5 * norm.ppf(0.7)))  # the 0.7 quantile of the lognormal
    assert bound.value == pytest.approx(quantile, rel=0.2)


def test_adaptive_clipping_splits_the_noise_so_the_total_is_unchanged():
    settings = privacy(clip_norm=1.0, noise_multiplier=1.0, adaptive_clipping="true", clipped_count_stddev=2.0)
    z = update_noise_multiplier(settings, 10)
    assert z > 1.0 and z**-2 + (2 * 2.0) ** -2 == pytest.approx(1.0)
    assert update_noise_multiplier(privacy(clip_norm=1.0, noise_multiplier=1.0), 10) == 1.0


def test_the_target_is_checked_before_the_round():
    accountant = Accountant(privacy(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, target_epsilon=6.0), 10, 10)
    spent = []
    while not accountant.next_round_exceeds():
        spent.append(accountant.spend_round())
    assert spent and spent[-1] <= 6.0 < reference_epsilon(1.0, len(spent) + 1, 1e-5, 10, 10)


@pytest.mark.parametrize(("population", "sampled", "rounds", "target"), [(10, 10, 5, 8.0), (2000, 100, 200, 4.0)])
def test_the_noise_for_a_target_is_the_smallest_that_meets_it(population, sampled, rounds, target):
    """Checked against dp-accounting called directly: the chosen z meets the target over the rounds, 0.2% less
    noise does not."""
    settings = privacy(clip_norm=1.0, noise_multiplier="null", delta=1e-6, target_epsilon=target)
    z = noise_for_target(settings, population, sampled, rounds)
    assert reference_epsilon(z, rounds, 1e-6, population, sampled) <= target
    assert reference_epsilon(z / 1.002, rounds, 1e-6, population, sampled) > target


def test_clipping_bounds_the_norm_and_keeps_the_direction():
    change = {"a": torch.full((3,), 3.0), "b": torch.full((4,), 4.0)}
    clipped, before = clip_update(change, 2.0)
    after = math.sqrt(sum(float(t.pow(2).sum()) for t in clipped.values()))
    assert before == pytest.approx(math.sqrt(27 + 64)) and after == pytest.approx(2.0)
    assert torch.allclose(clipped["a"] / clipped["b"][:3], change["a"] / change["b"][:3])
    small, _ = clip_update({"a": torch.ones(2)}, 5.0)
    assert torch.equal(small["a"], torch.ones(2))


def test_per_layer_clipping_keeps_the_whole_within_the_bound():
    change = {"big": torch.full((300,), 1.0), "small": torch.full((100,), 0.01)}
    clipped, was_clipped = clip_per_layer(change, 2.0)
    assert was_clipped
    assert float(clipped["big"].norm()) == pytest.approx(2.0 * math.sqrt(300 / 400))
    assert torch.equal(clipped["small"], change["small"]), "a layer within its bound is untouched"
    assert math.sqrt(sum(float(t.pow(2).sum()) for t in clipped.values())) <= 2.0
    _, _, flagged = privatise_change(change, 2.0, 0.0, 1, 0, 1, 0, per_layer=True)
    assert flagged and update_norm(change) < 20.0


def test_noise_shares_are_reproducible_per_round_and_client():
    like = {"w": torch.zeros(20000)}
    a = noise_share(like, 0.5, seed=0, round_=3, client=1)["w"]
    assert torch.equal(a, noise_share(like, 0.5, seed=0, round_=3, client=1)["w"])
    assert not torch.equal(a, noise_share(like, 0.5, seed=0, round_=3, client=2)["w"])
    assert not torch.equal(a, noise_share(like, 0.5, seed=0, round_=4, client=1)["w"])
    assert float(a.std()) == pytest.approx(0.5, rel=0.03)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"noise_multiplier": 1.0}, "needs privacy.clip_norm"),
        ({"clip_norm": 1.0, "target_epsilon": 5}, "needs privacy.noise_multiplier > 0"),
        ({"clip_norm": 1.0, "noise_multiplier": "null"}, "chooses the noise for privacy.target_epsilon, which is not"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 0.5}, "is not below 1/3 clients"),
        ({"clip_norm": 1.0, "noise_multiplier": 0.5, "adaptive_clipping": "true"}, "clipped_count_stddev above 0.25"),
    ],
)
def test_settings_that_make_no_sense_are_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        check_settings(privacy(**keys), 3, 3)


def test_the_command_refuses_them_before_flower_starts(small_partition, small_kmeans, tmp_path, capsys):
    out = tmp_path / "run"
    code = pretrain(small_partition, small_kmeans, out, "privacy.mode=server", "privacy.noise_multiplier=1.0")
    assert code == 2 and "needs privacy.clip_norm" in capsys.readouterr().err
    assert not (out / "flwr").exists()


# ------------------------------------------------------------------------------------------------ Flower runs
DP = ["strategy.fraction=0.6", "privacy.mode=server", "privacy.clip_norm=0.5", "privacy.noise_multiplier=0.4"]
ADAPTIVE = ["privacy.adaptive_clipping=true", "privacy.clipped_count_stddev=1.0"]  # 2 x 1.0 > 0.4: the split works


def pretrain(partition: Path, kmeans: Path, out: Path, *args: str) -> int:
    return run_cli("pretrain", "--partition", partition, "--kmeans", kmeans, "--out", out, *PRETRAIN_FAST, *args)


@pytest.mark.slow
def test_a_private_run_clips_accounts_and_resumes_exactly(small_partition, small_kmeans, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    pinned = ["train.optim.total_steps=9", "train.optim.warmup_steps=1"]  # what 3 rounds of 3 updates fit
    assert pretrain(small_partition, small_kmeans, whole, "--rounds", "3", *DP, *ADAPTIVE, *pinned) == 0
    train = rows(whole, "train")
    epsilons = [r["privacy_epsilon"] for r in train]
    assert len(epsilons) == 3 and epsilons == sorted(epsilons) and epsilons[0] > 0
    assert epsilons[-1] == pytest.approx(reference_epsilon(0.4, 3, 1e-5, 3, 2), rel=1e-9)
    clients = rows(whole, "client")
    assert all(r["update_norm"] > 0 for r in clients)
    assert [r["privacy_clipped_fraction"] for r in train] == [
        sum(c["update_norm"] > r["privacy_clip_norm"] for c in clients if c["round"] == r["round"]) / 2 for r in train
    ]
    bounds = [r["privacy_clip_norm"] for r in train]
    assert bounds[0] == 0.5 and len(set(bounds)) == 3, "adaptive clipping moves the bound every round"
    assert [r["privacy_next_clip_norm"] for r in train[:-1]] == bounds[1:]
    summary = json.loads((whole / "run.json").read_text())["summary"]
    assert summary["privacy"]["epsilon"] == pytest.approx(epsilons[-1]) and summary["privacy"]["delta"] == 1e-5
    report = write_report(whole).read_text()
    assert f"({epsilons[-1]:.3g}, 1e-05)-DP for each client's whole contribution after 3 rounds" in report
    assert f"clipped to a bound adapted from 0.5 to {summary['privacy']['final_clip_norm']:.3g}" in report

    assert pretrain(small_partition, small_kmeans, parts, "--rounds", "2", *DP, *ADAPTIVE, *pinned) == 0
    assert run_cli("pretrain", "--resume", parts, "num_rounds=3") == 0
    fixed = load_checkpoint(whole / "checkpoints" / "final.pt")
    resumed = load_checkpoint(parts / "checkpoints" / "final.pt")
    a, b = fixed["state_dict"], resumed["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a), "same clipping, same noise, same weights"
    assert rows(parts, "train")[-1]["privacy_epsilon"] == epsilons[-1]

    # Mode client: the clients clip and add the same noise shares, so the same model and the same epsilon.
    distributed = tmp_path / "client"
    client_dp = [a.replace("privacy.mode=server", "privacy.mode=client") for a in DP]
    assert pretrain(small_partition, small_kmeans, distributed, "--rounds", "3", *client_dp, *ADAPTIVE, *pinned) == 0
    c = load_checkpoint(distributed / "checkpoints" / "final.pt")["state_dict"]
    assert all(torch.allclose(a[k], c[k], atol=1e-4) for k in a), "noise placed on the clients, same sum"
    assert [r["privacy_epsilon"] for r in rows(distributed, "train")] == epsilons


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["server", "client"])
def test_clipping_alone_bounds_the_server_step(small_partition, small_kmeans, tmp_path, mode):
    """Without noise, FedAvg's step is the mean of changes clipped to clip_norm, so it cannot be longer; in mode
    client the changes are clipped (here per layer) before they leave the clients, as the server measures what
    arrives."""
    out = tmp_path / "clip"
    assert (
        pretrain(
            small_partition,
            small_kmeans,
            out,
            "--rounds",
            "2",
            f"privacy.mode={mode}",
            "privacy.clip_norm=0.05",
            f"privacy.per_layer_clipping={str(mode == 'client').lower()}",
            "privacy.audit_coordinates=64",
        )
        == 0
    )
    train = rows(out, "train")
    assert all(r["privacy_clipped_fraction"] == 1.0 for r in train), "tiny bound: every update is clipped"
    assert all(r["server_step_norm"] <= 0.05 * (1 + 1e-5) for r in train)
    clients = rows(out, "client")
    assert len(clients) == 2 * 3 and all(c["update_norm"] > 0.05 for c in clients)
    on_the_wire = [c["received_norm"] for c in clients]
    audits = [np.load(out / "audit" / f"round_{r:05d}.npz") for r in (1, 2)]
    assert all(a["clients"].tolist() == [0, 1, 2] and a["changes"].shape == (3, 64) for a in audits)
    if mode == "client":
        assert all(n <= 0.05 * (1 + 1e-5) for n in on_the_wire)
        assert all(np.linalg.norm(row) <= 0.05 * (1 + 1e-5) for a in audits for row in a["changes"])
    else:
        assert on_the_wire == [c["update_norm"] for c in clients], "the server saw them unclipped"
    assert all("privacy_epsilon" not in r for r in train), "no noise, no epsilon"
    assert json.loads((out / "run.json").read_text())["summary"]["privacy"]["epsilon"] == math.inf
    owned = [*PRETRAIN_OUTPUTS, CONFIG_FILE, RUN_FILE, LOG_DIR]
    unowned = [p.name for p in out.iterdir() if not any(fnmatch.fnmatch(p.name, o) for o in owned)]
    assert unowned == [], "everything the run wrote is the stage's own (so --force replaces it)"


@pytest.mark.slow
def test_a_target_without_a_noise_multiplier_chooses_the_noise_and_spends_it_all(
    small_partition, small_kmeans, tmp_path
):
    out = tmp_path / "chosen"
    chosen = [a for a in DP if not a.startswith("privacy.noise_multiplier")]
    target = 30.0
    args = ["--rounds", "3", *chosen, "privacy.noise_multiplier=null", f"privacy.target_epsilon={target}"]
    assert pretrain(small_partition, small_kmeans, out, *args) == 0
    record = json.loads((out / "run.json").read_text())
    summary = record["summary"]["privacy"]
    assert record["status"] == "completed" and summary["noise_chosen_for_target"] and summary["accounted_rounds"] == 3
    settings = privacy(clip_norm=0.5, noise_multiplier="null", target_epsilon=target)
    assert summary["noise_multiplier"] == pytest.approx(noise_for_target(settings, 3, 2, 3))
    assert summary["epsilon"] <= target
    assert summary["epsilon"] == pytest.approx(reference_epsilon(summary["noise_multiplier"], 3, 1e-5, 3, 2))
    assert summary["epsilon"] > reference_epsilon(summary["noise_multiplier"] * 1.01, 3, 1e-5, 3, 2)
    saved = load_checkpoint(out / "checkpoints" / "final.pt")["state"]["privacy"]
    assert saved["noise_multiplier"] == summary["noise_multiplier"]


@pytest.mark.slow
def test_the_run_stops_at_its_target_epsilon(small_partition, small_kmeans, tmp_path, capsys):
    out = tmp_path / "budget"
    target = (reference_epsilon(0.4, 2, 1e-5, 3, 2) + reference_epsilon(0.4, 3, 1e-5, 3, 2)) / 2
    assert pretrain(small_partition, small_kmeans, out, "--rounds", "5", *DP, f"privacy.target_epsilon={target}") == 75
    assert "would take epsilon above privacy.target_epsilon" in capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "stopped" and record["summary"]["stopped_after_round"] == 2
    assert record["summary"]["privacy"]["epsilon"] <= target
    assert (out / "checkpoints" / "round_00002.pt").is_file()
    assert run_cli("pretrain", "--resume", out) == 2
    assert "the privacy budget is spent" in capsys.readouterr().err
