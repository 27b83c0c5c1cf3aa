"""Shared fixtures: small real corpora made once per test session through the real command line."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from common import (
    DISTILL_FAST,
    EVAL_SHORT,
    KMEANS_FAST,
    PRETRAIN_FAST,
    SMALL_K,
    SMALL_LIBRISPEECH,
    TINY_LIBRISPEECH,
    TINY_SPEECH_COMMANDS,
    run_cli,
)
from fedhubert.parallel import THREAD_POOL_VARIABLES, available_cpus

os.environ.setdefault("FEDHUBERT_PROGRESS", "0")

# pytest-xdist workers share the cores: each worker, and every stage and daemon it starts, gets cores / workers
# threads in its OpenMP and BLAS pools (PyTorch reads OMP_NUM_THREADS when first imported, after this). A pool of all
# cores per process oversubscribes them: the deployment drill's two rounds (with twelve SuperNodes then) took 97 and
# 86 s with PyTorch's default, 43 and 33 s with one thread a process (measured beside two benchmarks and beside
# one). Flower's simulated clients set their own threads.
if (_workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))) > 0:
    for _name in THREAD_POOL_VARIABLES:
        os.environ.setdefault(_name, str(max(1, available_cpus() // _workers)))

# Session fixtures that run a stage (a Flower simulation, a training, S3PRL): a test that needs one is marked
# `stages`, so that `make test-quick` (-m "smoke or not (slow or stages)") leaves it to `make test`.
STAGE_FIXTURES = {"small_kmeans", "per_client_kmeans", "tiny_teacher", "four_rounds", "distilled", "evaluations"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if STAGE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.stages)


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`<shared>/<name>`, made by `build(path)` once per test session even across pytest-xdist workers: the first
    worker to need it builds it under a lock in the folder all workers' temporary folders share, the others wait
    for it and use it read-only (a session fixture is otherwise built once per worker: every stage fixture was
    built twice). A build that failed is retried by the next worker to need it, which reports its own failure."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "shared" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    done = out.parent / f".{out.name}.done"
    with FileLock(out.parent / f".{out.name}.lock"):
        if not done.exists():
            if out.exists():
                shutil.rmtree(out)
            build(out)
            done.touch()
    return out


@pytest.fixture
def task_identity():
    """Messages are made by a task: here, as the ServerApp's, in this process (Flower reads its identity)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="session")
def tiny_librispeech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def build(out: Path) -> None:
        assert run_cli("synth", "librispeech", "--out", out, "--workers", "2", *TINY_LIBRISPEECH) == 0

    return build_once(tmp_path_factory, "corpora/LibriSpeech", build)


@pytest.fixture(scope="session")
def small_librispeech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """More speakers, less audio each: enough speakers for partitions of several clients."""

    def build(out: Path) -> None:
        assert run_cli("synth", "librispeech", "--out", out, "--workers", "2", *SMALL_LIBRISPEECH) == 0

    return build_once(tmp_path_factory, "corpora/LibriSpeech-small", build)


@pytest.fixture(scope="session")
def small_partition(small_librispeech: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three balanced clients of the small corpus."""

    def build(out: Path) -> None:
        command = ("partition", "--corpus", small_librispeech, "--out", out, "--clients", "3", "use_cache=false")
        assert run_cli(*command) == 0

    return build_once(tmp_path_factory, "stages/partition", build)


@pytest.fixture(scope="session")
def small_labels(small_partition: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """k-means labels (one codebook of K=20, fitted centrally) for every client of the small partition,
    laid out as 'fedhubert kmeans' lays them out: <dir>/client_<i>/{train,valid}.km. Made without Flower."""
    import numpy as np

    from fedhubert.labels.features import featurise, load_features
    from fedhubert.labels.kmeans import fit_minibatch, label_lines, write_label_file
    from fedhubert.labels.settings import FeaturesConfig, MiniBatchConfig
    from fedhubert.manifest import read_manifest

    def build(out: Path) -> None:
        jobs = [
            (small_partition / f"client_{i}" / f"{s}.tsv", out / "features" / f"client_{i}" / s)
            for i in range(3)
            for s in ("train", "valid")
        ]
        featurise(jobs, FeaturesConfig(), workers=2)
        feats = {(m, p): load_features(p, m, FeaturesConfig()) for m, p in jobs}
        pooled = np.concatenate([np.asarray(f.feats, dtype=np.float32) for f in feats.values()])
        codebook = fit_minibatch(pooled, SMALL_K, MiniBatchConfig(n_init=2), 0, "test").cluster_centers_
        for (manifest, prefix), f in feats.items():
            lines, _, _ = label_lines(f, codebook)
            write_label_file(out / prefix.parent.name / f"{prefix.name}.km", lines, read_manifest(manifest))

    return build_once(tmp_path_factory, "stages/labels", build)


@pytest.fixture(scope="session")
def kmeans_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for every k-means run of the session (reused, as in real use)."""
    return tmp_path_factory.mktemp("stages") / "features"


@pytest.fixture(scope="session")
def small_kmeans(small_partition: Path, kmeans_features: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Federated k-means (a real Flower simulation, K=16) of the small partition."""

    def build(out: Path) -> None:
        features = f"feature_dir={kmeans_features}"
        assert run_cli("kmeans", "--partition", small_partition, "--out", out, *KMEANS_FAST, features) == 0

    return build_once(tmp_path_factory, "stages/kmeans", build)


@pytest.fixture(scope="session")
def per_client_kmeans(small_partition: Path, kmeans_features: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per-client k-means (a real Flower simulation, K=16, a codebook per client) of the small partition."""

    def build(out: Path) -> None:
        assert (
            run_cli(
                *("kmeans", "--partition", small_partition, "--out", out, "--mode", "per-client", *KMEANS_FAST),
                f"feature_dir={kmeans_features}",
            )
            == 0
        )

    return build_once(tmp_path_factory, "stages/kmeans-per-client", build)


@pytest.fixture(scope="session")
def tiny_teacher(small_partition: Path, small_labels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HuBERT trained for a few updates by `fedhubert train-local`: a real pretrained checkpoint."""

    def build(out: Path) -> None:
        manifests = [str(small_partition / f"client_{i}" / "train.tsv") for i in range(3)]
        labels = [str(small_labels / f"client_{i}" / "train.km") for i in range(3)]
        assert (
            run_cli(
                "train-local",
                "--out",
                out,
                "--preset",
                "tiny",
                "--steps",
                "10",
                f"num_classes={SMALL_K}",
                f"train_manifests={manifests}",
                f"train_labels={labels}",
                "checkpoint_every=10",
                "train.device=cpu",
                "train.optim.lr=2e-3",
                "train.optim.warmup_steps=2",
                "train.data.min_seconds=1",
                "train.data.max_seconds=3",
                "train.data.batch_seconds=12",
            )
            == 0
        )

    return build_once(tmp_path_factory, "stages/teacher", build) / "checkpoints" / "final.pt"


@pytest.fixture(scope="session")
def tiny_speech_commands(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def build(out: Path) -> None:
        assert run_cli("synth", "speech-commands", "--out", out, "--workers", "2", *TINY_SPEECH_COMMANDS) == 0

    return build_once(tmp_path_factory, "corpora/speech_commands", build)


@pytest.fixture(scope="session")
def four_rounds(small_partition: Path, small_kmeans: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Federated pretraining of the tiny preset: 4 rounds on Flower, 2 of the 3 clients sampled per round, with
    FedAdam (not the default) so that its moments are checkpointed and resumed, and one SuperNode per client (as
    in a real federation; the runs compared with it use the default pool of virtual clients)."""

    def build(out: Path) -> None:
        assert (
            run_cli(
                "pretrain",
                "--partition",
                small_partition,
                "--kmeans",
                small_kmeans,
                "--out",
                out,
                *PRETRAIN_FAST,
                "--rounds",
                "4",
                "strategy.fraction=0.6",
                "strategy.name=fedadam",
                "federation.virtual_clients=false",
            )
            == 0
        )

    return build_once(tmp_path_factory, "pretrain/four", build)


@pytest.fixture(scope="session")
def distilled(tiny_teacher: Path, small_partition: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Federated distillation of a 1-layer student from the tiny teacher: 2 rounds on Flower."""

    def build(out: Path) -> None:
        assert (
            run_cli(
                "distill",
                "--teacher",
                tiny_teacher,
                "--partition",
                small_partition,
                "--out",
                out,
                "--rounds",
                "2",
                *DISTILL_FAST,
            )
            == 0
        )

    return build_once(tmp_path_factory, "distill/run", build)


@pytest.fixture(scope="session")
def evaluations(
    tiny_speech_commands: Path, tiny_teacher: Path, distilled: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """S3PRL speech_commands (a few steps) on the tiny teacher (hubert_local) and the student (distiller_local)."""

    def build(root: Path) -> None:
        for name, checkpoint in (("teacher", tiny_teacher), ("student", distilled / "checkpoints" / "final.pt")):
            assert (
                run_cli(
                    "evaluate",
                    "speech-commands",
                    "--dataset",
                    tiny_speech_commands,
                    "--checkpoint",
                    checkpoint,
                    "--out",
                    root / name,
                    "--name",
                    name,
                    *EVAL_SHORT,
                )
                == 0
            )

    return build_once(tmp_path_factory, "evaluations/eval", build)
