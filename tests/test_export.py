"""The S3PRL `hubert_local` export by behaviour: the label rate it records, and the pretraining head (final_proj,
label_embs_concat) and mask embedding as S3PRL's fairseq HubertModel uses them, against our torchaudio model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchaudio.models.wav2vec2 import components

from fedhubert.config import load_config
from fedhubert.model.checkpoint import FORMAT, label_rate_of, load_checkpoint, save_checkpoint
from fedhubert.model.config import ModelConfig
from fedhubert.model.export import SPECIAL_SYMBOLS, export_checkpoint
from fedhubert.model.frames import feature_frames
from fedhubert.model.hubert import build_hubert

TINY = load_config(ModelConfig, None, ["preset=tiny"])
K = 12
SAMPLES = 24000  # 1.5 s: 74 transformer frames


def tiny_checkpoint(path: Path, **label_rate: int) -> torch.nn.Module:
    """A tiny HuBERT saved at `path` (with `label_rate=...`, or save_checkpoint's default); returned in eval mode."""
    torch.manual_seed(0)
    model = build_hubert(TINY, K)
    save_checkpoint(path, kind="hubert", model=TINY, num_classes=K, state_dict=model.state_dict(), **label_rate)
    return model.eval()


def exported_cfgs(path: Path) -> tuple[dict, dict]:
    content = torch.load(path, map_location="cpu", weights_only=True)
    return content["task_cfg"], content["model_cfg"]


def test_a_checkpoint_saved_at_50_hz_exports_50_hz(tmp_path):
    tiny_checkpoint(tmp_path / "iter2.pt", label_rate=50)
    assert load_checkpoint(tmp_path / "iter2.pt")["label_rate"] == 50
    record = export_checkpoint(tmp_path / "iter2.pt", "s3prl-hubert", tmp_path / "iter2_s3prl.pt")
    task_cfg, model_cfg = exported_cfgs(tmp_path / "iter2_s3prl.pt")
    assert task_cfg["label_rate"] == model_cfg["label_rate"] == 50
    assert record["label_rate"] == 50
    assert json.loads((tmp_path / "iter2_s3prl.pt.json").read_text())["label_rate"] == 50


def test_the_default_rate_is_100_hz(tmp_path):
    tiny_checkpoint(tmp_path / "iter1.pt")
    export_checkpoint(tmp_path / "iter1.pt", "s3prl-hubert", tmp_path / "iter1_s3prl.pt")
    task_cfg, model_cfg = exported_cfgs(tmp_path / "iter1_s3prl.pt")
    assert task_cfg["label_rate"] == model_cfg["label_rate"] == 100


def rewritten(source: Path, target: Path, change) -> Path:
    """`source`'s payload changed by `change`, saved as an older fedhubert wrote it (no sidecar)."""
    payload = load_checkpoint(source)
    change(payload)
    torch.save(payload, target)
    return target


def test_a_checkpoint_without_the_key_loads_as_100_hz(tmp_path):
    tiny_checkpoint(tmp_path / "new.pt", label_rate=50)
    old = rewritten(tmp_path / "new.pt", tmp_path / "old.pt", lambda p: p.pop("label_rate"))
    payload = load_checkpoint(old, kind="hubert")
    assert payload["format"] == FORMAT and "label_rate" not in payload and label_rate_of(payload) == 100
    export_checkpoint(old, "s3prl-hubert", tmp_path / "old_s3prl.pt")
    assert exported_cfgs(tmp_path / "old_s3prl.pt")[0]["label_rate"] == 100


def test_an_older_pretraining_checkpoint_keeps_the_rate_it_kept_in_its_state(tmp_path):
    """Federated pretraining recorded its true rate in state['label_rate'] while the top level said 100."""
    tiny_checkpoint(tmp_path / "new.pt")
    old = rewritten(tmp_path / "new.pt", tmp_path / "old.pt", lambda p: p["state"].update(label_rate=50))
    export_checkpoint(old, "s3prl-hubert", tmp_path / "old_s3prl.pt")
    assert exported_cfgs(tmp_path / "old_s3prl.pt")[1]["label_rate"] == 50


def fixed_mask(frames: int) -> torch.Tensor:
    """Two spans of masked frames, the rest unmasked: (1, frames)."""
    mask = torch.zeros(1, frames, dtype=torch.bool)
    mask[0, 5:17] = True
    mask[0, 40:55] = True
    return mask


@pytest.fixture
def both_models(tmp_path, request, monkeypatch):
    """(ours, S3PRL's HubertModel loaded by hubert_local from our export, the label rate), both masking the
    frames of `fixed_mask` where they would draw random spans."""
    import s3prl.hub as hub
    from s3prl.upstream.hubert import hubert_model

    rate = request.param
    ours = tiny_checkpoint(tmp_path / "model.pt", label_rate=rate)
    export_checkpoint(tmp_path / "model.pt", "s3prl-hubert", tmp_path / "model_s3prl.pt")
    theirs = hub.hubert_local(ckpt=str(tmp_path / "model_s3prl.pt")).model.eval()
    mask = fixed_mask(feature_frames(SAMPLES, TINY))
    monkeypatch.setattr(components, "_compute_mask_indices", lambda shape, *a, **k: mask.clone())
    monkeypatch.setattr(hubert_model, "compute_mask_indices", lambda shape, *a, **k: mask.numpy().copy())
    return ours, theirs, rate


def labels_at(rate: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels at `rate` as a label file holds them, fairseq's dictionary indices; one per transformer frame, as
    our trainer aligns them): at 100 Hz frame t takes label 2t."""
    generator = torch.Generator().manual_seed(rate)
    step = rate // 50
    at_rate = torch.randint(K, (1, frames * step), generator=generator)
    return at_rate + len(SPECIAL_SYMBOLS), at_rate[:, ::step]


@pytest.mark.parametrize("both_models", [100, 50], indirect=True)
def test_exported_head_gives_our_masked_prediction_logits(both_models):
    ours, theirs, rate = both_models
    wave = torch.randn(1, SAMPLES, generator=torch.Generator().manual_seed(1)) * 0.1
    frames = feature_frames(SAMPLES, TINY)
    fairseq_targets, per_frame = labels_at(rate, frames)
    with torch.no_grad():
        logit_m, logit_u, _ = ours(wave, per_frame)
        out = theirs(wave, target_list=[fairseq_targets], padding_mask=torch.zeros_like(wave, dtype=torch.bool))
    [fs_m], [fs_u] = out["logit_m_list"], out["logit_u_list"]
    masked = int(fixed_mask(frames).sum())
    assert logit_m.shape == (masked, K + 1) and fs_m.shape == (masked, len(SPECIAL_SYMBOLS) + K + 1)
    for mine, fairseq in ((logit_m, fs_m), (logit_u, fs_u)):
        # column 0: the positive; then fairseq's 4 special symbols (zero embeddings: cosine 0), then the K
        # clusters, the positive's own at -inf in both
        torch.testing.assert_close(fairseq[:, :1], mine[:, :1], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(fairseq[:, 1 + len(SPECIAL_SYMBOLS) :], mine[:, 1:], atol=1e-3, rtol=1e-4)
        assert torch.equal(fairseq[:, 1 : 1 + len(SPECIAL_SYMBOLS)], torch.zeros(len(fairseq), len(SPECIAL_SYMBOLS)))
    assert ours.logit_generator.temperature == theirs.logit_temp == TINY.logit_temperature


def our_encoder_output(model, wave: torch.Tensor, masked: bool) -> torch.Tensor:
    """Our model's transformer output, the fixed mask's frames replaced by its mask embedding when `masked`."""
    wav2vec2 = model.wav2vec2
    x, lengths = wav2vec2.feature_extractor(wave, None)
    x, attention_mask = wav2vec2.encoder._preprocess(x, lengths)
    if masked:
        x, _ = model.mask_generator(x, None)
    return wav2vec2.encoder.transformer(x, attention_mask=attention_mask)


@pytest.mark.parametrize("both_models", [100], indirect=True)
def test_exported_mask_embedding_masks_as_ours_does(both_models):
    ours, theirs, _ = both_models
    assert torch.equal(theirs.mask_emb, ours.mask_generator.mask_embedding)
    wave = torch.randn(1, SAMPLES, generator=torch.Generator().manual_seed(2)) * 0.1
    padding = torch.zeros_like(wave, dtype=torch.bool)
    with torch.no_grad():
        for masked in (True, False):
            fairseq = theirs(wave, padding_mask=padding, mask=masked, features_only=True)["x"]
            torch.testing.assert_close(fairseq, our_encoder_output(ours, wave, masked), atol=1e-4, rtol=1e-4)
        unmasked = our_encoder_output(ours, wave, False)
        assert not torch.allclose(our_encoder_output(ours, wave, True), unmasked, atol=1e-2), (
            "the mask embedding changes the encoder's output"
        )


def test_train_local_records_the_rate_of_its_labels(tmp_path):
    """HuBERT iteration 2: labels of a HuBERT layer, one per 20 ms frame, as a k-means run lays them out."""
    import numpy as np
    import soundfile as sf

    from common import run_cli
    from fedhubert.manifest import ManifestEntry, write_manifest

    run = tmp_path / "kmeans"
    (run / "client_0").mkdir(parents=True)
    (run / "kmeans.json").write_text(json.dumps({"label_rate": 50, "num_clusters": K, "label_head": "shared"}))
    rng = np.random.default_rng(0)
    entries, lines = [], []
    for i, seconds in enumerate((2.0, 2.5)):
        wav = (rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)
        sf.write(tmp_path / f"{i}.flac", wav, 16000)
        entries.append(ManifestEntry(f"{i}.flac", len(wav)))
        lines.append(" ".join(str(k % K) for k in range(feature_frames(len(wav), TINY))))
    write_manifest(run / "client_0" / "train.tsv", tmp_path, entries)
    (run / "client_0" / "train.km").write_text("\n".join(lines) + "\n")
    out = tmp_path / "train"
    assert (
        run_cli(
            "train-local",
            "--out",
            out,
            "--preset",
            "tiny",
            "--steps",
            "2",
            "checkpoint_every=2",
            f"train_manifests={[str(run / 'client_0' / 'train.tsv')]}",
            f"train_labels={[str(run / 'client_0' / 'train.km')]}",
            "train.device=cpu",
            "train.data.min_seconds=1",
            "train.data.max_seconds=2",
            "train.data.batch_seconds=4",
        )
        == 0
    )
    assert load_checkpoint(out / "checkpoints" / "final.pt")["label_rate"] == 50
