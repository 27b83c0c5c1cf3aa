"""HuBERT model pieces: logits and loss on known inputs, masking, checkpointing, presets, memory estimate."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torchaudio.models.wav2vec2.components import LogitGenerator

from fedhubert.config import load_config
from fedhubert.model.config import ModelConfig
from fedhubert.model.frames import feature_frames
from fedhubert.model.hubert import LabelLogits, build_hubert, enable_checkpointing
from fedhubert.train.config import LossConfig, OptimConfig
from fedhubert.train.loop import hubert_loss, learning_rate
from fedhubert.train.memory import estimate_activation_bytes, measure_saved_bytes

TINY = load_config(ModelConfig, None, ["preset=tiny"])


def test_logits_equal_torchaudio_with_the_positive_first():
    torch.manual_seed(0)
    original = LogitGenerator(64, 20, 16, skip_masked=False, skip_nomask=False)
    ours = copy.deepcopy(original)
    ours.__class__ = LabelLogits
    x = torch.randn(3, 50, 64)
    labels = torch.randint(0, 20, (3, 50))
    mask = torch.rand(3, 50) < 0.6
    for a, b, rows in zip(
        original(x, labels, mask, ~mask), ours(x, labels, mask, ~mask), (mask.sum(), (~mask).sum()), strict=True
    ):
        assert a.shape == b.shape == (rows, 21)
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b)), "the positive's own class is -inf among the negatives"
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-4)
    logit_m, _ = ours(x, labels, mask, ~mask)
    own = torch.gather(logit_m[:, 1:], 1, labels[mask].unsqueeze(1))
    assert torch.all(own == float("-inf"))


def test_temperature_scales_the_logits():
    torch.manual_seed(0)
    a = build_hubert(TINY, 10).logit_generator
    b = copy.deepcopy(a)
    b.temperature = 0.2
    x, labels = torch.randn(1, 30, TINY.embed_dim), torch.randint(0, 10, (1, 30))
    mask = torch.ones(1, 30, dtype=torch.bool)
    la, lb = a(x, labels, mask, ~mask)[0], b(x, labels, mask, ~mask)[0]
    finite = torch.isfinite(la)
    torch.testing.assert_close(la[finite], 2 * lb[finite])


def test_loss_targets_index_zero_not_the_cluster_id():
    logit_m = torch.tensor([[5.0, 0.0, -math.inf, 0.0], [0.0, 5.0, 0.0, -math.inf]])
    logit_u = torch.tensor([[9.0, 0.0, 0.0, -math.inf]])
    out = hubert_loss(logit_m, logit_u, torch.tensor(0.5), LossConfig())
    expected = (-(torch.log_softmax(logit_m, dim=1)[:, 0]).sum() + 10 * 0.5 * 2) / 2
    torch.testing.assert_close(out.loss, expected)
    assert {k: out.sums[k] for k in ("masked", "correct_m", "unmasked", "correct_u")} == {
        "masked": 2,
        "correct_m": 1,
        "unmasked": 1,
        "correct_u": 1,
    }
    assert out.sums["predicted"].tolist() == [1, 1, 0], "frame 1 is cluster 1, right; frame 2 is cluster 2, taken for 0"
    assert out.sums["ce_m"] == pytest.approx(float(-(torch.log_softmax(logit_m, dim=1)[:, 0]).sum()))
    weighted = hubert_loss(logit_m, logit_u, torch.tensor(0.0), LossConfig(unmasked_weight=1.0, feature_penalty=0))
    assert weighted.loss > hubert_loss(logit_m, logit_u, torch.tensor(0.0), LossConfig(feature_penalty=0)).loss


def test_masking_covers_about_half_the_frames_and_labels_must_match_frames():
    torch.manual_seed(0)
    model = build_hubert(TINY, 10).train()
    samples = 16000 * 4
    frames = feature_frames(samples, TINY)
    assert frames == (samples - 400) // 320 + 1 == 199
    logit_m, logit_u, penalty = model(torch.randn(2, samples) * 0.1, torch.randint(0, 10, (2, frames)))
    share = logit_m.shape[0] / (2 * frames)
    assert logit_m.shape[0] + logit_u.shape[0] == 2 * frames and 0.4 < share < 0.85
    assert logit_m.shape[1] == 11 and penalty.ndim == 0
    with pytest.raises(ValueError, match="length of label must match"):
        model(torch.randn(1, samples), torch.randint(0, 10, (1, frames - 1)))


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_hubert(TINY, 10).train()
    recomputed = copy.deepcopy(plain)
    enable_checkpointing(recomputed, layers=True, cnn=True)
    assert set(plain.state_dict()) == set(recomputed.state_dict()), "names unchanged"
    wav, labels = torch.randn(2, 32000) * 0.1, torch.randint(0, 10, (2, feature_frames(32000, TINY)))
    grads = []
    for model in (plain, recomputed):
        torch.manual_seed(1)  # same masks and dropout
        logit_m, logit_u, penalty = model(wav, labels)
        hubert_loss(logit_m, logit_u, penalty, LossConfig()).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointing_saves_activation_memory_and_the_estimate_tracks_it():
    torch.manual_seed(0)
    results = {}
    for layers, cnn in ((False, False), (True, False), (True, True)):
        model = build_hubert(TINY, 10).train()
        enable_checkpointing(model, layers, cnn)
        samples = 16000 * 3
        with measure_saved_bytes() as saved:
            logit_m, logit_u, penalty = model(
                torch.randn(2, samples), torch.randint(0, 10, (2, feature_frames(samples, TINY)))
            )
        hubert_loss(logit_m, logit_u, penalty, LossConfig()).loss.backward()
        estimate = estimate_activation_bytes(
            TINY, 2, samples, num_classes=10, checkpoint_layers=layers, checkpoint_cnn=cnn
        )
        assert 0.6 < estimate / saved["bytes"] < 1.6, (layers, cnn, estimate, saved["bytes"])
        results[(layers, cnn)] = saved["bytes"]
    assert results[(True, True)] < results[(True, False)] < results[(False, False)]


def test_learning_rate_warms_up_then_decays_linearly():
    optim = OptimConfig(lr=1e-3, warmup_steps=10, total_steps=110)
    assert learning_rate(0, optim) == pytest.approx(1e-4)
    assert learning_rate(9, optim) == pytest.approx(1e-3)
    assert learning_rate(60, optim) == pytest.approx(5e-4)
    assert learning_rate(110, optim) == 0 and learning_rate(500, optim) == 0


def test_base_preset_is_hubert_base_sized():
    model = build_hubert(load_config(ModelConfig), 100)
    params = sum(p.numel() for p in model.parameters())
    assert 94e6 < params < 96e6
    assert len(model.wav2vec2.encoder.transformer.layers) == 12
