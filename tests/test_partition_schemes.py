"""Partition schemes as pure functions: invariants, skew, sizes, determinism and impossible requests."""

from __future__ import annotations

import numpy as np
import pytest

from fedhubert.config import load_config
from fedhubert.errors import ConfigError
from fedhubert.partition import schemes
from fedhubert.partition.config import PartitionConfig
from fedhubert.partition.schemes import PartitionError, SpeakerLoad


def population(n: int = 120, seed: int = 0) -> list[SpeakerLoad]:
    rng = np.random.default_rng(seed)
    subsets = ["train-clean-100", "train-clean-360", "train-other-500"]
    return [
        SpeakerLoad(
            1000 + i, "F" if rng.random() < 0.5 else "M", subsets[int(rng.integers(3))], float(rng.uniform(300, 1800))
        )
        for i in range(n)
    ]


def assign(scheme: str, speakers, n: int, seed: int, **kw):
    rng = np.random.default_rng(seed)
    if scheme == "balanced":
        return schemes.balanced(speakers, n, rng)
    if scheme == "quantity":
        return schemes.quantity(speakers, n, kw.get("exponent", 1.0), rng)
    if scheme == "dirichlet":
        return schemes.dirichlet(speakers, n, kw.get("alpha", 0.5), kw.get("attribute", "sex"), rng)
    clients, unassigned = schemes.natural(speakers, kw.get("g", 1), None, rng)
    assert unassigned == []
    return clients


@pytest.mark.parametrize("scheme", ["balanced", "quantity", "dirichlet", "natural"])
def test_every_speaker_in_exactly_one_nonempty_client(scheme):
    speakers = population()
    clients = assign(scheme, speakers, 10, seed=1, g=4)
    flat = [s for c in clients for s in c]
    assert sorted(flat) == sorted(s.speaker_id for s in speakers), "speaker-disjoint and complete"
    assert all(clients), "no client is empty"
    assert clients == assign(scheme, speakers, 10, seed=1, g=4), "same seed, same partition"


def test_balanced_equalises_hours_not_speaker_counts():
    speakers = population(200)
    loads = {s.speaker_id: s.seconds for s in speakers}
    hours = np.array([sum(loads[s] for s in c) for c in assign("balanced", speakers, 8, seed=0)])
    assert hours.std() / hours.mean() < 0.01
    # Two long speakers among many short ones: equal hours need unequal speaker counts.
    uneven = [SpeakerLoad(i, "F", "train-clean-100", 3000.0 if i < 2 else 300.0) for i in range(40)]
    clients = assign("balanced", uneven, 4, seed=0)
    hours = np.array([sum(3000.0 if s < 2 else 300.0 for s in c) for c in clients])
    assert hours.max() - hours.min() <= 300.0
    assert sorted(len(c) for c in clients) == [6, 6, 14, 14]


def test_quantity_sizes_follow_the_power_law():
    speakers = population(300)
    loads = {s.speaker_id: s.seconds for s in speakers}
    sizes = np.array([sum(loads[s] for s in c) for c in assign("quantity", speakers, 6, seed=0, exponent=1.0)])
    expected = 1 / np.arange(1, 7)
    np.testing.assert_allclose(sizes / sizes.sum(), expected / expected.sum(), atol=0.02)
    flat = np.array([sum(loads[s] for s in c) for c in assign("quantity", speakers, 6, seed=0, exponent=0.0)])
    assert flat.std() / flat.mean() < 0.02, "exponent 0 gives equal sizes"


@pytest.mark.parametrize("attribute", ["sex", "subset"])
def test_dirichlet_skew_grows_as_alpha_shrinks(attribute):
    speakers = population(240)
    by_id = {s.speaker_id: s for s in speakers}

    def mean_skew(alpha: float) -> float:
        return float(
            np.mean(
                [
                    schemes.skew(
                        assign("dirichlet", speakers, 8, seed, alpha=alpha, attribute=attribute), by_id, attribute
                    )
                    for seed in range(6)
                ]
            )
        )

    low, mid, high = mean_skew(0.05), mean_skew(1.0), mean_skew(100.0)
    assert low > mid > high
    assert high < 0.1 and low > 0.3


def test_dirichlet_with_tiny_alpha_still_fills_every_client():
    speakers = population(12)
    clients = assign("dirichlet", speakers, 6, seed=3, alpha=0.01)
    assert all(clients) and sorted(s for c in clients for s in c) == sorted(s.speaker_id for s in speakers)


def test_natural_groups_and_sampling():
    speakers = population(10)
    clients, unassigned = schemes.natural(speakers, 3, None, np.random.default_rng(0))
    assert sorted(len(c) for c in clients) == [1, 3, 3, 3] and unassigned == []
    sampled, left = schemes.natural(speakers, 1, 4, np.random.default_rng(0))
    assert len(sampled) == 4 and len(left) == 6
    assert sorted([s for c in sampled for s in c] + left) == sorted(s.speaker_id for s in speakers)


def test_impossible_requests_stop_with_a_clear_error():
    speakers = population(5)
    for scheme in ("balanced", "quantity", "dirichlet"):
        with pytest.raises(PartitionError, match=r"num_clients=6 but only 5 speakers"):
            assign(scheme, speakers, 6, seed=0)
    with pytest.raises(PartitionError, match=r"make only 3 groups of 2"):
        schemes.natural(speakers, 2, 4, np.random.default_rng(0))


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("dirichlet.alpha=0", r"key 'dirichlet.alpha' must be > 0"),
        ("dirichlet.alpha=-1", r"key 'dirichlet.alpha' must be > 0"),
        ("num_clients=0", r"key 'num_clients' must be >= 1"),
        ("scheme=random", r"key 'scheme' must be one of"),
        ("train_subsets=[train-clean-999]", r"key 'train_subsets\[0\]' must be one of"),
        ("heldout_subsets=[train-clean-100]", r"in both 'train_subsets' and 'heldout_subsets'"),
    ],
)
def test_bad_partition_configs(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(PartitionConfig, None, ["corpus=/data/LibriSpeech", override])


def test_corpus_is_required():
    with pytest.raises(ConfigError, match=r"key 'corpus' is required: pass --corpus"):
        load_config(PartitionConfig)
