"""Streaming aggregation against the list-based one it replaces: every reply held, privatised one by one
(`privatise_change`), and all handed at once to Flower's own strategy. Equal to float tolerance for FedAvg and
FedAdam, both privacy modes, a failed client left out and bfloat16 changes; the arrival order does not matter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from fedhubert.config import load_config
from fedhubert.fl.aggregation import WEIGHT_KEY, StreamingMean
from fedhubert.fl.config import PrivacyConfig, StrategyConfig
from fedhubert.fl.privacy import UpdateAudit, privatise_change, update_norm
from fedhubert.fl.server_step import server_step
from fedhubert.fl.strategy import make_strategy
from fedhubert.fl.weights import decode, encode

SEED, ROUND = 3, 7


pytestmark = pytest.mark.usefixtures("task_identity")


def model(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    return {
        "encoder.weight": torch.from_numpy(rng.normal(size=(6, 5)).astype(np.float32)),
        "encoder.bias": torch.from_numpy(rng.normal(size=(5,)).astype(np.float32)),
        "head": torch.from_numpy(rng.normal(size=(4, 3)).astype(np.float32)),
    }


def replies(reference: dict, clients: list[int], rng: np.random.Generator) -> dict[int, tuple[dict, dict]]:
    """Each client's trained weights and metrics (examples in seconds, a loss, and a client index)."""
    out = {}
    for client in clients:
        scale = 0.05 * (1 + client)
        weights = {
            k: t + torch.from_numpy(rng.normal(scale=scale, size=t.shape).astype(np.float32))
            for k, t in reference.items()
        }
        out[client] = (weights, {WEIGHT_KEY: 3.5 + 2.25 * client, "train_loss": 1.0 + 0.1 * client, "client": client})
    return out


def privacy(mode: str, **keys: object) -> PrivacyConfig:
    return load_config(PrivacyConfig, None, [f"mode={mode}", *(f"{k}={v}" for k, v in keys.items())])


def list_based(strategy_cfg, reference, accepted, privacy_cfg, clip, noise):
    """Today's aggregation: privatise each reply (mode server), then Flower's strategy over all of them."""
    strategy = make_strategy(strategy_cfg)
    strategy.begin_round(reference)
    messages = []
    for client, (weights, metrics) in sorted(accepted.items()):
        change = {k: weights[k] - reference[k] for k in reference}
        if privacy_cfg.mode == "server":
            change, _, _ = privatise_change(
                change, clip, noise, len(accepted), SEED, ROUND, client, privacy_cfg.per_layer_clipping
            )
        weight = 1 if privacy_cfg.mode != "none" else metrics[WEIGHT_KEY]
        record = MetricRecord({**{k: v for k, v in metrics.items() if k != WEIGHT_KEY}, WEIGHT_KEY: weight})
        arrays = encode({k: reference[k] + change[k] for k in change}, "float32")
        messages.append(Message(RecordDict({"arrays": arrays, "metrics": record}), dst_node_id=0, message_type="train"))
    new, metrics = strategy.aggregate(ROUND, messages, {k: np.dtype(np.float32) for k in reference})
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in new.items()}, dict(metrics)


def streamed(strategy_cfg, reference, accepted, privacy_cfg, clip, noise, order, transfer="float32", audit=None):
    """The round loop's way: each change folded in as it arrives, the strategy applied to the mean."""
    stream = StreamingMean(
        reference, privacy_cfg, clip=clip, noise_multiplier=noise, seed=SEED, round_=ROUND, audit=audit
    )
    for client in order:
        weights, metrics = accepted[client]
        change = {k: weights[k] - reference[k] for k in reference}
        if transfer == "bfloat16":  # what the client sends and the server decodes
            change = decode(encode(change, "bfloat16"), "bfloat16")
        stream.add(client, change, dict(metrics), update_norm(change))
    result = stream.result()
    strategy = make_strategy(strategy_cfg)
    strategy.begin_round(reference)
    mean = encode({k: reference[k] + result.change[k] for k in reference}, "float32")
    message = Message(
        RecordDict({"arrays": mean, "metrics": MetricRecord({WEIGHT_KEY: 1.0})}), dst_node_id=0, message_type="train"
    )
    new, _ = strategy.aggregate(ROUND, [message], {k: np.dtype(np.float32) for k in reference})
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in new.items()}, result, stream


STRATEGIES = {
    "fedavg": StrategyConfig(),
    "fedavgm": StrategyConfig(name="fedavgm", eta=0.5, momentum=0.9),
    "fedadam": StrategyConfig(name="fedadam", eta=1e-2, tau=1e-3),
    "fedyogi": StrategyConfig(name="fedyogi", eta=1e-2, tau=1e-3),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize(
    "mode, keys, noise",
    [
        ("none", {}, 0.0),
        ("server", {"clip_norm": 0.3}, 0.7),
        ("server", {"clip_norm": 0.3, "per_layer_clipping": "true"}, 0.7),
    ],
)
def test_the_streamed_mean_equals_the_list_based_aggregate(name, mode, keys, noise):
    rng = np.random.default_rng(0)
    reference = model(rng)
    sampled = [1, 4, 5, 8, 9]
    accepted = replies(reference, sampled, rng)
    del accepted[5]  # a failed client: left out of both
    cfg = privacy(mode, **keys)
    clip = keys.get("clip_norm")
    expected, expected_metrics = list_based(STRATEGIES[name], reference, accepted, cfg, clip, noise)
    for order in ([1, 4, 8, 9], [9, 1, 8, 4]):
        got, result, _ = streamed(STRATEGIES[name], reference, accepted, cfg, clip, noise, order)
        for key in reference:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
            assert got[key].dtype == torch.float32
        assert result.metrics["train_loss"] == pytest.approx(expected_metrics["train_loss"], rel=1e-9)
        assert result.replies == 4


def test_arrival_order_does_not_change_the_weights():
    """Float64 sums: a resumed run, whose replies arrive in another order, ends with the same float32 weights."""
    rng = np.random.default_rng(1)
    reference = model(rng)
    accepted = replies(reference, list(range(12)), rng)
    cfg = privacy("none")
    first, _, _ = streamed(STRATEGIES["fedavg"], reference, accepted, cfg, None, 0.0, list(range(12)))
    for seed in range(3):
        order = [int(c) for c in np.random.default_rng(seed).permutation(12)]
        again, _, _ = streamed(STRATEGIES["fedavg"], reference, accepted, cfg, None, 0.0, order)
        assert all(torch.equal(first[k], again[k]) for k in reference)


def test_mode_client_takes_the_clients_noised_changes_with_equal_weights():
    rng = np.random.default_rng(2)
    reference = model(rng)
    accepted = replies(reference, [0, 2, 3], rng)
    cfg = privacy("client", clip_norm=0.3, noise_multiplier=1.0)
    noised = {}
    for client, (weights, metrics) in accepted.items():  # what each client sends in mode client
        change, norm, clipped = privatise_change(
            {k: weights[k] - reference[k] for k in reference}, 0.3, 1.0, 4, SEED, ROUND, client
        )
        noised[client] = (
            {k: reference[k] + change[k] for k in change},
            {**metrics, "update_norm": norm, "clipped": int(clipped)},
        )
    none = privacy("none")
    expected, _ = list_based(StrategyConfig(), reference, noised, none, None, 0.0)
    expected_equal = {  # equal weights, not examples
        k: reference[k] + sum(noised[c][0][k] - reference[k] for c in noised) / len(noised) for k in reference
    }
    got, result, stream = streamed(StrategyConfig(), reference, noised, cfg, 0.3, 1.0, [3, 0, 2])
    for key in reference:
        torch.testing.assert_close(got[key], expected_equal[key], rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(expected[k], got[k]) for k in reference)  # example weights would differ
    assert sorted(result.norms) == sorted(noised[c][1]["update_norm"] for c in noised)
    report = stream.privacy_report(sampled=4)  # one of 4 sampled clients did not reply: less noise on the mean
    assert report.noise_std == pytest.approx(1.0 * 0.3 * math.sqrt(3 / 4) / 3)


def test_bfloat16_changes_aggregate_like_their_decoded_values():
    rng = np.random.default_rng(3)
    reference = model(rng)
    accepted = replies(reference, [0, 1, 2], rng)
    rounded = {}
    for client, (weights, metrics) in accepted.items():
        change = decode(encode({k: weights[k] - reference[k] for k in reference}, "bfloat16"), "bfloat16")
        rounded[client] = ({k: reference[k] + change[k] for k in change}, metrics)
    cfg = privacy("none")
    expected, _ = list_based(StrategyConfig(), reference, rounded, cfg, None, 0.0)
    got, _, _ = streamed(StrategyConfig(), reference, accepted, cfg, None, 0.0, [2, 0, 1], transfer="bfloat16")
    for key in reference:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_the_round_statistics_and_the_audit_come_from_the_stream(tmp_path):
    rng = np.random.default_rng(4)
    reference = model(rng)
    accepted = replies(reference, [0, 1, 2, 3], rng)
    audit = UpdateAudit(tmp_path / "audit", reference, 10, SEED)
    cfg = privacy("none")
    got, result, stream = streamed(StrategyConfig(), reference, accepted, cfg, None, 0.0, [3, 1, 0, 2], audit=audit)
    stats = server_step(reference, got, result.change)
    assert stats["step_ratio"] == pytest.approx(1.0, abs=1e-5) and stats["step_cosine"] == pytest.approx(1.0, abs=1e-5)
    audit.write(ROUND, stream.audited)
    saved = np.load(tmp_path / "audit" / f"round_{ROUND:05d}.npz")
    assert saved["clients"].tolist() == [0, 1, 2, 3]
    for row, client in zip(saved["changes"], saved["clients"], strict=True):
        weights = accepted[int(client)][0]
        np.testing.assert_array_equal(row, audit.coordinates({k: weights[k] - reference[k] for k in reference}))


def test_fedavgm_is_server_momentum_on_the_mean_change_and_resumes_exactly():
    """FedAvgM: the server keeps m = momentum x m + (sent - mean) and moves by eta x m, against the arrays the
    loop sent (not Flower's own record of its last result); a strategy restored from its state mid-run continues
    with the same weights."""
    cfg = StrategyConfig(name="fedavgm", eta=0.5, momentum=0.9)
    assert cfg.server_rates() == (0.5, None) and StrategyConfig(name="fedavgm").server_rates() == (1.0, None)
    rng = np.random.default_rng(2)
    weights = model(rng)
    shifts = [{k: 0.1 * torch.from_numpy(rng.normal(size=t.shape).astype(np.float32)) for k, t in weights.items()}]
    shifts.append({k: t + 0.05 for k, t in shifts[0].items()})

    def step(strategy, sent, shift, round_):
        strategy.begin_round(sent)
        mean = {k: sent[k] + shift[k] for k in sent}
        message = Message(
            RecordDict({"arrays": encode(mean, "float32"), "metrics": MetricRecord({WEIGHT_KEY: 1.0})}),
            dst_node_id=0,
            message_type="train",
        )
        new, _ = strategy.aggregate(round_, [message], {k: np.dtype(np.float32) for k in sent})
        return {k: torch.from_numpy(a.numpy().copy()) for k, a in new.items()}, mean

    strategy = make_strategy(cfg)
    first, mean = step(strategy, weights, shifts[0], 1)
    momentum = {k: weights[k].double() - mean[k].double() for k in weights}
    for k in weights:
        torch.testing.assert_close(first[k], (weights[k].double() - 0.5 * momentum[k]).float())
    saved = {"name": "fedavgm", **strategy.state()}
    second, mean = step(strategy, first, shifts[1], 2)
    momentum = {k: 0.9 * momentum[k] + (first[k].double() - mean[k].double()) for k in first}
    for k in first:
        torch.testing.assert_close(second[k], (first[k].double() - 0.5 * momentum[k]).float())
    restored = make_strategy(cfg)
    restored.load_state(saved)
    again, _ = step(restored, first, shifts[1], 2)
    assert all(torch.equal(again[k], second[k]) for k in second)
