"""MFCC features: the recipe's frame count and numbers, matching torchaudio's Kaldi MFCC."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from fedhubert.labels.mfcc import FEATURE_DIM, KaldiMfcc, reference_features
from fedhubert.model.frames import mfcc_frames as num_frames


@pytest.mark.parametrize(
    "samples, frames", [(0, 0), (399, 0), (400, 1), (559, 1), (560, 2), (16000, 98), (16000 * 15, 1498)]
)
def test_frame_count_is_the_recipe_formula(samples, frames):
    assert num_frames(samples) == frames
    wav = np.random.default_rng(0).standard_normal(samples).astype(np.float32) * 0.1
    assert KaldiMfcc()(wav).shape == (frames, FEATURE_DIM)


def test_equals_torchaudio_kaldi_mfcc_with_deltas_on_real_speech(tiny_librispeech):
    extractor = KaldiMfcc()
    for path in sorted(tiny_librispeech.glob("*/*/*/*.flac"))[:8]:
        wav = sf.read(path, dtype="float32")[0]
        ours, reference = extractor(wav), reference_features(wav)
        assert ours.shape == reference.shape == (num_frames(len(wav)), 39)
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-3 * np.abs(reference).max())


def test_equals_reference_on_noise_and_silence_edges():
    rng = np.random.default_rng(1)
    for wav in (rng.standard_normal(7000).astype(np.float32) * 0.3, np.zeros(1600, dtype=np.float32)):
        np.testing.assert_allclose(KaldiMfcc()(wav), reference_features(wav), rtol=1e-4, atol=1e-3)


def test_utterance_normalisation_normalises_each_dimension_and_the_others_keep_raw_mfcc():
    from fedhubert.labels.features import extract, extractor_for
    from fedhubert.labels.settings import FeaturesConfig

    wav = np.random.default_rng(2).standard_normal(16000).astype(np.float32) * 0.2
    feats = extract(extractor_for(FeaturesConfig(normalize="utterance")), wav)
    np.testing.assert_allclose(feats.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(feats.std(axis=0), 1, atol=1e-3)
    for later in ("none", "speaker"):  # speaker: normalised once all of the speaker's frames are known
        raw = extract(extractor_for(FeaturesConfig(normalize=later)), wav)
        np.testing.assert_allclose(raw, KaldiMfcc()(wav), rtol=1e-6)
        assert np.abs(raw.mean(axis=0)).max() > 1
