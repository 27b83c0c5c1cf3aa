"""Features cache and k-means pieces, without Flower: alignment, reuse, bad input, Lloyd updates, label files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedhubert.fl.exchange import Exchanged, FittedTimeout
from fedhubert.labels.features import FeatureError, FeatureSet, extract, extractor_for, featurise, load_features
from fedhubert.labels.federated import sampling_error
from fedhubert.labels.kmeans import (
    ClusterStats,
    KMeansError,
    StatsSum,
    centred,
    cluster_stats,
    fit_minibatch,
    initial_codebook,
    label_lines,
    lloyd_update,
    uncentred,
    write_label_file,
)
from fedhubert.labels.mfcc import KaldiMfcc
from fedhubert.labels.settings import FeaturesConfig, MiniBatchConfig
from fedhubert.manifest import ManifestError, read_manifest
from fedhubert.model.checkpoint import load_checkpoint, model_config_of, save_checkpoint
from fedhubert.model.frames import mfcc_frames as num_frames


def test_features_follow_the_manifest_row_by_row_and_are_reused(small_partition, tmp_path):
    manifest_path = small_partition / "client_0" / "train.tsv"
    prefix = tmp_path / "feats" / "client_0" / "train"
    stats = featurise([(manifest_path, prefix)], FeaturesConfig(dtype="float32"), workers=2)
    assert stats["computed"] == 1
    manifest = read_manifest(manifest_path)
    feats = load_features(prefix, manifest_path, FeaturesConfig(dtype="float32"))
    assert len(feats) == len(manifest)
    extractor = KaldiMfcc()
    for i, entry in enumerate(manifest.entries):
        assert len(feats.utterance(i)) == num_frames(entry.num_samples)
    wav = sf.read(manifest.audio_path(2), dtype="float32")[0]
    np.testing.assert_allclose(feats.utterance(2), extractor(wav), rtol=1e-6)
    again = featurise([(manifest_path, prefix)], FeaturesConfig(dtype="float32"), workers=2)
    assert (again["computed"], again["reused"]) == (0, 1)
    half = featurise([(manifest_path, prefix)], FeaturesConfig(dtype="float16"), workers=1)
    assert half["computed"] == 1, "other settings, other features"
    assert load_features(prefix, manifest_path, FeaturesConfig()).feats.dtype == np.float16


def damaged_manifest(small_partition: Path, tmp_path: Path, damage) -> Path:
    lines = (small_partition / "client_0" / "train.tsv").read_text().splitlines()
    corpus = Path(lines[0])
    copy = tmp_path / "corpus"
    rows = []
    for line in lines[1:4]:
        rel, samples = line.split("\t")
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(corpus / rel, copy / rel)
        rows.append([rel, samples])
    damage(copy, rows)
    path = tmp_path / "train.tsv"
    path.write_text("\n".join([str(copy)] + [f"{r}\t{n}" for r, n in rows]) + "\n")
    return path


def test_a_hubert_extractor_is_kept_per_process_until_its_checkpoint_changes(tiny_teacher, tmp_path):
    checkpoint = tmp_path / "hubert.pt"
    shutil.copy(tiny_teacher, checkpoint)
    settings = FeaturesConfig(kind="hubert", checkpoint=checkpoint, layer=1)
    first = extractor_for(settings)
    assert extractor_for(settings) is first
    wav = (np.random.default_rng(0).standard_normal(24000) * 0.1).astype(np.float32)
    before = extract(first, wav)
    assert before.shape == (first.frames(len(wav)), first.dims)
    payload = load_checkpoint(checkpoint, kind="hubert")
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    save_checkpoint(
        checkpoint,
        kind="hubert",
        model=model_config_of(payload),
        num_classes=payload["num_classes"],
        state_dict=state,
    )
    changed = extractor_for(settings)
    assert changed is not first and changed.checkpoint_sha256 != first.checkpoint_sha256
    assert not np.allclose(extract(changed, wav), before)


def test_length_disagreeing_with_the_manifest_stops_and_names_the_row(small_partition, tmp_path):
    def shorten(copy, rows):
        rows[1][1] = str(int(rows[1][1]) + 160)

    manifest = damaged_manifest(small_partition, tmp_path, shorten)
    with pytest.raises(FeatureError, match=r"manifest line 3: .* samples, the manifest says"):
        featurise([(manifest, tmp_path / "f" / "train")], FeaturesConfig(), workers=1)
    with pytest.raises(FeatureError, match="no current features"):
        load_features(tmp_path / "f" / "train", manifest, FeaturesConfig())


def test_unreadable_audio_stops_and_names_the_row(small_partition, tmp_path):
    def corrupt(copy, rows):
        (copy / rows[0][0]).write_bytes(b"garbage" * 100)

    manifest = damaged_manifest(small_partition, tmp_path, corrupt)
    with pytest.raises(FeatureError, match=r"manifest line 2: cannot read the header"):
        featurise([(manifest, tmp_path / "f" / "train")], FeaturesConfig(), workers=1)


def moved_rows(small_partition: Path, folder: Path, count: int = 3) -> tuple[Path, Path]:
    """Copies of client 0's manifests in which its last `count` train rows moved to valid: a speaker in both."""
    train = (small_partition / "client_0" / "train.tsv").read_text().splitlines()
    valid = (small_partition / "client_0" / "valid.tsv").read_text().splitlines()
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("\n".join(train[:-count]) + "\n")
    (folder / "valid.tsv").write_text("\n".join(valid + train[-count:]) + "\n")
    return folder / "train.tsv", folder / "valid.tsv"


def speaker_rows(manifest_path: Path, feats: FeatureSet) -> dict[int, np.ndarray]:
    rows: dict[int, list[np.ndarray]] = {}
    for i, entry in enumerate(read_manifest(manifest_path).entries):
        rows.setdefault(int(Path(entry.path).name.split("-")[0]), []).append(np.asarray(feats.utterance(i)))
    return {speaker: np.concatenate(parts) for speaker, parts in rows.items()}


def test_speaker_normalisation_pools_each_speaker_over_a_clients_manifests(small_partition, tmp_path):
    manifests = moved_rows(small_partition, tmp_path / "client_0")
    jobs = [(m, tmp_path / "feats" / m.stem) for m in manifests]
    raw_jobs = [(m, tmp_path / "raw" / m.stem) for m in manifests]
    speaker, none = FeaturesConfig(normalize="speaker", dtype="float32"), FeaturesConfig(dtype="float32")
    assert featurise(jobs, speaker, workers=2)["computed"] == 2
    featurise(raw_jobs, none, workers=1)
    normalised = [speaker_rows(m, load_features(p, m, speaker)) for m, p in jobs]
    raw = [speaker_rows(m, load_features(p, m, none)) for m, p in raw_jobs]
    shared = set(raw[0]) & set(raw[1])
    assert shared, "the moved rows put a speaker in both manifests"
    for spk in set(raw[0]) | set(raw[1]):
        frames = np.concatenate([r[spk] for r in raw if spk in r]).astype(np.float64)
        mean, std = frames.mean(axis=0), frames.std(axis=0)
        for split in range(2):
            if spk in raw[split]:
                np.testing.assert_allclose(normalised[split][spk], (raw[split][spk] - mean) / std, rtol=1e-3, atol=1e-3)
        pooled = np.concatenate([n[spk] for n in normalised if spk in n])
        np.testing.assert_allclose(pooled.mean(axis=0), 0, atol=1e-4)
        np.testing.assert_allclose(pooled.std(axis=0), 1, atol=1e-3)
    for spk in shared:
        assert np.abs(normalised[1][spk].mean(axis=0)).max() > 0.05, "valid alone is not its own normalisation unit"


def test_a_cache_made_with_other_normalisation_or_pooled_manifests_is_not_reused(small_partition, tmp_path):
    train, valid = moved_rows(small_partition, tmp_path / "client_0")
    jobs = [(train, tmp_path / "feats" / "train"), (valid, tmp_path / "feats" / "valid")]
    speaker, utterance = FeaturesConfig(normalize="speaker"), FeaturesConfig(normalize="utterance")
    assert featurise(jobs, speaker, workers=2)["computed"] == 2
    assert (featurise(jobs, speaker, workers=2)["reused"]) == 2
    assert featurise(jobs, utterance, workers=2)["computed"] == 2
    with pytest.raises(FeatureError, match="no current features"):
        load_features(tmp_path / "feats" / "train", train, speaker)
    assert featurise(jobs, speaker, workers=2)["computed"] == 2
    load_features(tmp_path / "feats" / "train", train, speaker)
    valid.write_text("\n".join(valid.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(FeatureError, match="no current features"):
        load_features(tmp_path / "feats" / "train", train, speaker), "valid's frames were in train's statistics"
    again = featurise(jobs, speaker, workers=2)
    assert (again["computed"], again["reused"]) == (2, 0), "the pool is recomputed as a whole"


def test_speaker_normalisation_needs_librispeech_file_names(small_partition, tmp_path):
    def rename(copy, rows):
        old = copy / rows[1][0]
        old.rename(old.with_name("take-two.flac"))
        rows[1][0] = str(Path(rows[1][0]).with_name("take-two.flac"))

    manifest = damaged_manifest(small_partition, tmp_path, rename)
    with pytest.raises(
        FeatureError,
        match=r"normalize=speaker: .*train.tsv:3: .*take-two.flac' is not named "
        r"<speaker>-<chapter>-<utterance>.flac.*normalize=utterance",
    ):
        featurise([(manifest, tmp_path / "f" / "train")], FeaturesConfig(normalize="speaker"), workers=1)
    assert (
        featurise([(manifest, tmp_path / "f" / "train")], FeaturesConfig(normalize="utterance"), workers=1)["computed"]
        == 1
    )


def test_manifest_escaping_its_root_is_refused(tmp_path):
    path = tmp_path / "evil.tsv"
    path.write_text("/data\n../../etc/passwd\t16000\n")
    with pytest.raises(ManifestError, match="must be relative to the manifest root"):
        read_manifest(path)


def blobs(seed: int = 0, k: int = 6, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10, size=(k, 39))
    points = np.concatenate([c + rng.normal(size=(n, 39)) for c in centres])
    return points.astype(np.float32), centres


def whole(points: np.ndarray) -> FeatureSet:
    """Frames as one utterance."""
    return FeatureSet(points, np.array([0, len(points)]))


def test_lloyd_update_from_split_statistics_equals_a_pooled_update():
    points, _ = blobs()
    centroids = points[:6].astype(np.float64)
    halves = [points[::2], points[1::2]]
    stats = [cluster_stats(whole(part), centroids) for part in halves]
    new, reseeded = lloyd_update(stats, centroids, np.random.default_rng(0))
    pooled = cluster_stats(whole(points), centroids)
    filled = pooled.counts > 0
    np.testing.assert_allclose(new[filled], pooled.sums[filled] / pooled.counts[filled, None], rtol=1e-10)
    assert reseeded == list(np.flatnonzero(~filled))


def test_lloyd_update_with_seen_counts_is_the_running_mean_of_every_round():
    """Mini-batch rounds over samples of clients: with fixed assignments, the centroid after two rounds is the
    mean of both rounds' frames, not only the last round's."""
    points, _ = blobs()
    centroids = points[:6].astype(np.float64)
    first, second = points[::2], points[1::2]
    seen = np.zeros(len(centroids))
    after_first, _ = lloyd_update([cluster_stats(whole(first), centroids)], centroids, np.random.default_rng(0), seen)
    stats_second = cluster_stats(whole(second), centroids)  # assigned by the same centroids, for a closed form
    after_second, _ = lloyd_update([stats_second], after_first, np.random.default_rng(0), seen)
    pooled = cluster_stats(whole(points), centroids)
    filled = pooled.counts > 0
    np.testing.assert_allclose(after_second[filled], pooled.sums[filled] / pooled.counts[filled, None], rtol=1e-10)
    np.testing.assert_array_equal(seen, pooled.counts)


def test_centred_float32_statistics_keep_the_lloyd_update_of_float64_ones():
    """HuBERT-sized statistics (768 dims, frames far from the origin, 100,000 frames): the centred float32 wire
    form gives the float64 centroids and squared errors, where raw sums cast to float32 would not."""
    rng = np.random.default_rng(0)
    centroids = rng.normal(50.0, 5.0, size=(4, 768))
    x = (np.repeat(centroids, 25_000, axis=0) + rng.normal(0, 0.5, size=(100_000, 768))).astype(np.float32)
    exact = cluster_stats(whole(x), centroids)
    wire = centred(exact, centroids)
    assert all(a.dtype == np.float32 for a in wire)
    back = uncentred(*wire, exact.counts, centroids, exact.inertia, exact.frames)
    new_exact, _ = lloyd_update([exact], centroids, np.random.default_rng(0))
    new_wire, _ = lloyd_update([back], centroids, np.random.default_rng(0))
    np.testing.assert_allclose(new_wire, new_exact, rtol=0, atol=1e-5)
    sse = lambda s: (s.sumsq - np.square(s.sums) / s.counts[:, None]).sum()  # noqa: E731
    assert sse(back) == pytest.approx(sse(exact), rel=1e-4)
    raw = ClusterStats(
        exact.sums.astype(np.float32), exact.sumsq.astype(np.float32), exact.counts, exact.inertia, exact.frames
    )
    assert abs(sse(raw) - sse(exact)) > 100 * abs(sse(back) - sse(exact)), "float32 raw sums lose the spread"


def test_empty_clusters_are_reseeded_by_splitting_the_worst():
    points, _ = blobs(k=2)
    far = np.full((3, 39), 1e6)
    centroids = np.concatenate([points[:1], points[-1:], far]).astype(np.float64)
    stats = [cluster_stats(whole(points), centroids)]
    assert list(stats[0].counts[2:]) == [0, 0, 0]
    new, reseeded = lloyd_update(stats, centroids, np.random.default_rng(0))
    assert reseeded == [2, 3, 4]
    assert np.all(np.abs(new[2:]) < 1e3), "re-seeded near the data"
    after = cluster_stats(whole(points), new)
    assert np.all(after.counts > 0)


def test_initial_codebook_weights_local_centroids_and_needs_enough_of_them():
    points, centres = blobs(k=4)
    local = [(points[:300], np.ones(300)), (points[300:], np.ones(500))]
    codebook = initial_codebook(local, 4, seed=0)
    distances = np.linalg.norm(codebook[:, None] - centres[None], axis=2).min(axis=0)
    assert np.all(distances < 1.0)
    with pytest.raises(KMeansError, match="shared 3 local centroids, fewer than num_clusters=4"):
        initial_codebook([(points[:3], np.ones(3))], 4, seed=0)


def test_sampling_error_is_the_spread_of_the_clients_inertia_per_frame():
    """A Lloyd round on a sample of clients estimates the inertia per frame of all of them: over many samples of 50
    of 2,000 clients the estimates spread as sampling_error says (times the finite-population correction)."""
    rng = np.random.default_rng(0)
    frames = rng.integers(200, 5000, size=2000).astype(float)
    per_frame = rng.lognormal(0.0, 0.4, size=2000)
    inertia = per_frame * frames
    truth = float(inertia.sum() / frames.sum())
    estimates, errors = [], []
    for _ in range(400):
        sample = rng.choice(2000, size=50, replace=False)
        estimates.append(inertia[sample].sum() / frames[sample].sum())
        errors.append(sampling_error(inertia[sample], frames[sample]))
    spread = np.std(estimates) / truth
    predicted = np.mean(errors) * np.sqrt(1 - 50 / 2000)
    assert abs(np.mean(estimates) / truth - 1) < 0.01
    assert 0.8 < spread / predicted < 1.25, (spread, predicted)
    assert sampling_error(inertia[:1], frames[:1]) == 0.0
    assert sampling_error(2.0 * frames[:10], frames[:10]) == pytest.approx(0.0, abs=1e-12)


def test_replies_summed_as_they_arrive_give_the_update_of_all_replies_in_any_order():
    """The server folds each client's centred float32 statistics into one float64 sum as its reply lands: the
    Lloyd update and the inertia equal those of the replies uncentred one by one, and the float32 codebook does not
    depend on the order the replies came in."""
    rng = np.random.default_rng(1)
    centroids = rng.normal(20.0, 3.0, size=(8, 39))
    sent = centroids.astype(np.float32)
    clients = [
        (centroids[rng.integers(0, 8, 400)] + rng.normal(0, 1.0, (400, 39))).astype(np.float32) for _ in range(30)
    ]
    stats = [cluster_stats(whole(x), sent) for x in clients]
    one_by_one = [uncentred(*centred(s, sent), s.counts, sent, s.inertia, s.frames) for s in stats]
    expected, _ = lloyd_update(one_by_one, centroids, np.random.default_rng(0))
    codebooks = []
    for order in (range(30), reversed(range(30)), rng.permutation(30)):
        summed = StatsSum(sent)
        for client in order:
            summed.add(client, *centred(stats[client], sent), stats[client].counts, stats[client].inertia)
        total = summed.total()
        assert len(summed) == 30 and total.frames == 30 * 400
        assert total.inertia == pytest.approx(sum(s.inertia for s in stats), rel=1e-12)
        new, _ = lloyd_update([total], centroids, np.random.default_rng(0))
        np.testing.assert_allclose(new, expected, rtol=1e-9)
        codebooks.append(new.astype(np.float32))
    for codebook in codebooks[1:]:
        np.testing.assert_array_equal(codebook, codebooks[0])


def test_a_fitted_timeout_waits_the_cap_until_measured_then_about_the_rounds_pace():
    timeout = FittedTimeout(3600.0)
    assert timeout.seconds() == 3600.0
    timeout.observe(Exchanged(["late"], 3600.0))  # a round that timed out says nothing of the clients' pace
    assert timeout.seconds() == 3600.0
    timeout.observe(Exchanged([], 10.0))
    assert timeout.seconds() == 3 * 10.0 + 60
    timeout.observe(Exchanged([7], 2.0))
    assert timeout.seconds() == 90.0
    capped = FittedTimeout(50.0)
    capped.observe(Exchanged([], 10.0))
    assert capped.seconds() == 50.0
    unbounded = FittedTimeout(None)
    assert unbounded.seconds() is None
    unbounded.observe(Exchanged([], 100.0))
    assert unbounded.seconds() == 360.0


def test_too_few_frames_for_k_is_a_clear_error():
    points, _ = blobs(n=2)
    with pytest.raises(KMeansError, match="client 7 has 12 frames, fewer than num_clusters=20"):
        fit_minibatch(points, 20, MiniBatchConfig(n_init=1), 0, "client 7")


def test_label_files_are_checked_against_their_manifest(small_partition, tmp_path):
    manifest_path = small_partition / "client_1" / "valid.tsv"
    prefix = tmp_path / "valid"
    featurise([(manifest_path, prefix)], FeaturesConfig(), workers=1)
    feats = load_features(prefix, manifest_path, FeaturesConfig())
    points = np.asarray(feats.feats[:50], dtype=np.float32)
    lines, usage, _ = label_lines(feats, points[:5])
    manifest = read_manifest(manifest_path)
    write_label_file(tmp_path / "valid.km", lines, manifest)
    written = (tmp_path / "valid.km").read_text().splitlines()
    assert [len(line.split()) for line in written] == [num_frames(e.num_samples) for e in manifest.entries]
    assert usage.sum() == feats.num_frames
    with pytest.raises(KMeansError, match="line 1 has"):
        write_label_file(tmp_path / "bad.km", [lines[0] + " 3"] + lines[1:], manifest)
    with pytest.raises(ManifestError, match="lines for a manifest of"):
        write_label_file(tmp_path / "bad.km", lines[:-1], manifest)
    assert not (tmp_path / "bad.km").exists()
