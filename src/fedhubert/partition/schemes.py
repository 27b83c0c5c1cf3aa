"""Assigning whole speakers to clients. Pure functions of the speakers' attributes and a random generator."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from fedhubert.errors import FedhubertError


class PartitionError(FedhubertError):
    """The requested partition cannot be made from these speakers."""


@dataclass(frozen=True)
class SpeakerLoad:
    speaker_id: int
    sex: str
    subset: str
    seconds: float

    def attribute(self, name: str) -> str:
        return self.sex if name == "sex" else self.subset


Clients = list[list[int]]


def _check_count(speakers: list[SpeakerLoad], num_clients: int) -> None:
    if num_clients > len(speakers):
        raise PartitionError(
            f"num_clients={num_clients} but only {len(speakers)} speakers have usable audio in the training "
            f"subsets; every client needs at least one whole speaker: lower num_clients or add training subsets"
        )


def _longest_first(speakers: list[SpeakerLoad], rng: np.random.Generator) -> list[SpeakerLoad]:
    """Speakers by decreasing duration; ties broken by a seeded shuffle."""
    shuffled = [speakers[i] for i in rng.permutation(len(speakers))]
    return sorted(shuffled, key=lambda s: -s.seconds)


def balanced(speakers: list[SpeakerLoad], num_clients: int, rng: np.random.Generator) -> Clients:
    """Near-equal audio per client: longest speaker first, each to the client with the least audio so far."""
    _check_count(speakers, num_clients)
    heap = [(0.0, c) for c in range(num_clients)]
    clients: Clients = [[] for _ in range(num_clients)]
    for speaker in _longest_first(speakers, rng):
        load, c = heapq.heappop(heap)
        clients[c].append(speaker.speaker_id)
        heapq.heappush(heap, (load + speaker.seconds, c))
    return clients


def quantity(speakers: list[SpeakerLoad], num_clients: int, exponent: float, rng: np.random.Generator) -> Clients:
    """Power-law client sizes: client k (from 1) targets a share of the audio proportional to k^-exponent."""
    _check_count(speakers, num_clients)
    shares = np.arange(1, num_clients + 1, dtype=float) ** -exponent
    targets = shares / shares.sum() * sum(s.seconds for s in speakers)
    order = _longest_first(speakers, rng)
    clients: Clients = [[] for _ in range(num_clients)]
    loads = np.zeros(num_clients)
    for c, speaker in enumerate(order[:num_clients]):  # one speaker each, largest to the largest target
        clients[c].append(speaker.speaker_id)
        loads[c] += speaker.seconds
    for speaker in order[num_clients:]:
        c = int(np.argmax(targets - loads))
        clients[c].append(speaker.speaker_id)
        loads[c] += speaker.seconds
    return clients


def dirichlet(
    speakers: list[SpeakerLoad],
    num_clients: int,
    alpha: float,
    attribute: str,
    rng: np.random.Generator,
    attempts: int = 100,
) -> Clients:
    """Attribute skew: the speakers of each attribute value are spread over the clients in proportions drawn from
    Dirichlet(alpha), so small alpha concentrates each value on few clients. Draws are repeated until every
    client has a speaker; after `attempts` failures, empty clients take a speaker from the largest ones."""
    _check_count(speakers, num_clients)
    values = sorted({s.attribute(attribute) for s in speakers})
    ordered = sorted(speakers, key=lambda s: s.speaker_id)
    clients: Clients = []
    for _ in range(attempts):
        clients = [[] for _ in range(num_clients)]
        for value in values:
            members = [s.speaker_id for s in ordered if s.attribute(attribute) == value]
            members = [members[i] for i in rng.permutation(len(members))]
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = np.round(np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for c, part in enumerate(np.split(np.array(members, dtype=int), cuts)):
                clients[c].extend(int(x) for x in part)
        if all(clients):
            return clients
    for c in range(num_clients):
        if not clients[c]:
            donor = max(range(num_clients), key=lambda d: (len(clients[d]), -d))
            clients[c].append(clients[donor].pop(int(rng.integers(len(clients[donor])))))
    return clients


def natural(
    speakers: list[SpeakerLoad], speakers_per_client: int, num_clients: int | None, rng: np.random.Generator
) -> tuple[Clients, list[int]]:
    """Clients of `speakers_per_client` speakers (the last may have fewer). With `num_clients`, that many groups
    are drawn at random and the other speakers stay unassigned (returned second)."""
    ids = sorted(s.speaker_id for s in speakers)
    ids = [ids[i] for i in rng.permutation(len(ids))]
    groups = [ids[i : i + speakers_per_client] for i in range(0, len(ids), speakers_per_client)]
    if num_clients is None:
        return groups, []
    if num_clients > len(groups):
        raise PartitionError(
            f"num_clients={num_clients} but {len(ids)} speakers make only {len(groups)} groups of "
            f"{speakers_per_client}; lower num_clients or natural.speakers_per_client, or set num_clients=null"
        )
    chosen = sorted(int(g) for g in rng.choice(len(groups), size=num_clients, replace=False))
    left = set(range(len(groups))) - set(chosen)
    return [groups[g] for g in chosen], sorted(x for g in left for x in groups[g])


def mix(clients: Clients, speakers: dict[int, SpeakerLoad], attribute: str) -> list[dict[str, float]]:
    """Per client, the share of its audio (by duration) for each value of `attribute`."""
    out = []
    for members in clients:
        total = sum(speakers[s].seconds for s in members) or 1.0
        shares: dict[str, float] = {}
        for s in members:
            key = speakers[s].attribute(attribute)
            shares[key] = shares.get(key, 0.0) + speakers[s].seconds / total
        out.append(shares)
    return out


def skew(clients: Clients, speakers: dict[int, SpeakerLoad], attribute: str) -> float:
    """Mean total-variation distance between each client's attribute mix and the whole population's (0: IID)."""
    population = mix([[s for c in clients for s in c]], speakers, attribute)[0]
    keys = set(population)
    distances = [
        0.5 * sum(abs(m.get(k, 0.0) - population.get(k, 0.0)) for k in keys) for m in mix(clients, speakers, attribute)
    ]
    return float(np.mean(distances)) if distances else 0.0
