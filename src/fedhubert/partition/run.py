"""`fedhubert partition`: scan the corpus, assign speakers to clients, and write manifests and records.

Outputs under --out: `partition.json`, `client_<i>/{train,valid}.{tsv,wrd}`, `global/<subset>.{tsv,wrd}`,
`client_configs/client_<i>.yaml`, `rejected.tsv`, `summary.md` and `clients.png`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from fedhubert.atomic import atomic_write_text
from fedhubert.config import config_to_dict
from fedhubert.corpus.header_cache import default_cache_dir
from fedhubert.corpus.librispeech import LIBRISPEECH_SUBSETS, CorpusError, Utterance, scan_librispeech
from fedhubert.manifest import ManifestEntry, file_sha256, write_aligned_lines, write_manifest
from fedhubert.partition import schemes
from fedhubert.partition.config import PartitionConfig
from fedhubert.partition.report import plot_clients, summary_table
from fedhubert.partition.schemes import SpeakerLoad
from fedhubert.partition.validation import split_client
from fedhubert.runlog import StageRun

log = logging.getLogger(__name__)

PARTITION_FILE = "partition.json"
FORMAT = "fedhubert-partition-v1"


def client_dir_name(index: int) -> str:
    return f"client_{index}"


def _write_split(folder: Path, name: str, root: Path, utterances: list[Utterance]) -> dict[str, str]:
    """Write <name>.tsv and the aligned <name>.wrd; return their sha256 hashes."""
    tsv, wrd = folder / f"{name}.tsv", folder / f"{name}.wrd"
    write_manifest(tsv, root, [ManifestEntry(u.path, u.num_samples) for u in utterances])
    write_aligned_lines(wrd, [u.transcript for u in utterances], len(utterances))
    return {tsv.name: file_sha256(tsv), wrd.name: file_sha256(wrd)}


def _hours(utterances: list[Utterance]) -> float:
    return round(sum(u.seconds for u in utterances) / 3600, 5)


def _assign(
    cfg: PartitionConfig, loads: list[SpeakerLoad], rng: np.random.Generator
) -> tuple[list[list[int]], list[int]]:
    if cfg.scheme == "balanced":
        return schemes.balanced(loads, cfg.num_clients, rng), []
    if cfg.scheme == "quantity":
        return schemes.quantity(loads, cfg.num_clients, cfg.quantity.exponent, rng), []
    if cfg.scheme == "dirichlet":
        return schemes.dirichlet(loads, cfg.num_clients, cfg.dirichlet.alpha, cfg.dirichlet.attribute, rng), []
    return schemes.natural(loads, cfg.natural.speakers_per_client, cfg.num_clients, rng)


def _client_config_text(index: int, cfg: PartitionConfig, speakers: int, hours: float) -> str:
    return (
        f"# Per-client overrides for client {index} ({cfg.scheme} partition, seed {cfg.seed}: "
        f"{speakers} speakers, {hours:.3f} h).\n"
        f"# Keys set here override the stage configs for this client only (its batch size, local steps or\n"
        f"# device on a heterogeneous federation). Empty: the client runs with the stage configs as they are.\n"
        "{}\n"
    )


def run_partition(cfg: PartitionConfig, out: Path, run: StageRun) -> dict:
    root = Path(cfg.corpus).resolve()
    cache_dir = (cfg.cache_dir or default_cache_dir()) if cfg.use_cache else None
    scan = scan_librispeech(
        root,
        [*cfg.train_subsets, *cfg.heldout_subsets],
        workers=cfg.workers,
        cache_dir=cache_dir,
        verify_audio=cfg.verify_audio,
    )
    missing = [s for s in cfg.train_subsets if s not in scan.subsets]
    if missing:
        found = [s for s in LIBRISPEECH_SUBSETS if (root / s).is_dir()]
        raise CorpusError(
            f"training subsets {missing} are not in {root} (it has: {', '.join(found) or 'no LibriSpeech subsets'}); "
            f"set train_subsets to the subsets you have, e.g. train_subsets=[{','.join(found[:1])}]"
        )
    absent = [s for s in cfg.heldout_subsets if s not in scan.subsets]
    if absent:
        log.info("held-out subsets not in the corpus, skipped: %s", ", ".join(absent))

    train_set = set(cfg.train_subsets)
    by_speaker: dict[int, list[Utterance]] = defaultdict(list)
    heldout: dict[str, list[Utterance]] = defaultdict(list)
    for u in scan.utterances:
        (by_speaker[u.speaker] if u.subset in train_set else heldout[u.subset]).append(u)
    leaked = sorted({u.speaker for us in heldout.values() for u in us} & set(by_speaker))
    if leaked:
        log.warning(
            "speakers %s are in both training and held-out subsets; held-out results will be optimistic", leaked[:10]
        )
    loads = []
    for speaker, utts in sorted(by_speaker.items()):
        seconds_by_subset = Counter()
        for u in utts:
            seconds_by_subset[u.subset] += u.seconds
        loads.append(
            SpeakerLoad(
                speaker,
                scan.speakers[speaker].sex,
                seconds_by_subset.most_common(1)[0][0],
                sum(seconds_by_subset.values()),
            )
        )
    if not loads:
        raise CorpusError(f"no usable utterances in {', '.join(cfg.train_subsets)} under {root} (see rejected.tsv)")

    rng = np.random.default_rng(cfg.seed)
    clients, unassigned = _assign(cfg, loads, rng)
    speakers = {s.speaker_id: s for s in loads}
    sex_mix = schemes.mix(clients, speakers, "sex")
    subset_mix = schemes.mix(clients, speakers, "subset")
    records = []
    for index, members in enumerate(clients):
        split = split_client(
            [u for s in members for u in by_speaker[s]], cfg.validation.fraction, cfg.validation.min_speakers, rng
        )
        folder = out / client_dir_name(index)
        hashes = {
            **_write_split(folder, "train", root, split.train),
            **_write_split(folder, "valid", root, split.valid),
        }
        hours = _hours(split.train) + _hours(split.valid)
        atomic_write_text(
            out / "client_configs" / f"{client_dir_name(index)}.yaml",
            _client_config_text(index, cfg, len(members), hours),
        )
        records.append(
            {
                "client": index,
                "dir": client_dir_name(index),
                "speakers": sorted(members),
                "valid_split": split.mode,
                "valid_speakers": split.valid_speakers,
                "utterances": {"train": len(split.train), "valid": len(split.valid)},
                "hours": {"train": _hours(split.train), "valid": _hours(split.valid)},
                "sex_mix": {k: round(v, 4) for k, v in sorted(sex_mix[index].items())},
                "subset_mix": {k: round(v, 4) for k, v in sorted(subset_mix[index].items())},
                "manifests": hashes,
            }
        )

    global_records = {}
    for subset in [s for s in cfg.heldout_subsets if s in heldout]:
        utts = sorted(heldout[subset], key=lambda u: u.path)
        hashes = _write_split(out / "global", subset, root, utts)
        global_records[subset] = {
            "utterances": len(utts),
            "hours": _hours(utts),
            "speakers": len({u.speaker for u in utts}),
            "manifests": hashes,
        }

    atomic_write_text(
        out / "rejected.tsv", "path\treason\n" + "".join(f"{r.path}\t{r.reason}\n" for r in scan.rejected)
    )
    reasons = Counter(r.reason for r in scan.rejected)
    if scan.rejected:
        log.warning(
            "%d files rejected (listed in %s): %s",
            len(scan.rejected),
            out / "rejected.tsv",
            "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(5)),
        )
    hours = np.array([r["hours"]["train"] + r["hours"]["valid"] for r in records])
    skew = {
        "hours_cv": round(float(hours.std() / hours.mean()), 4) if hours.mean() > 0 else 0.0,
        "sex_tv": round(schemes.skew(clients, speakers, "sex"), 4),
        "subset_tv": round(schemes.skew(clients, speakers, "subset"), 4),
    }
    partition = {
        "format": FORMAT,
        "corpus": str(root),
        "scheme": cfg.scheme,
        "seed": cfg.seed,
        "num_clients": len(clients),
        "config": config_to_dict(cfg),
        "clients": records,
        "unassigned_speakers": unassigned,
        "heldout": global_records,
        "rejected": {"count": len(scan.rejected), "by_reason": dict(reasons.most_common())},
        "skew": skew,
    }
    atomic_write_text(out / PARTITION_FILE, json.dumps(partition, indent=2) + "\n")
    table = summary_table(partition)
    atomic_write_text(out / "summary.md", table)
    plot_clients(partition, out / "clients.png")
    log.info("%s partition of %d speakers into %d clients:\n%s", cfg.scheme, len(loads), len(clients), table)
    summary = {
        "clients": len(clients),
        "speakers": len(loads),
        "unassigned_speakers": len(unassigned),
        "utterances": sum(r["utterances"]["train"] + r["utterances"]["valid"] for r in records),
        "hours": round(float(hours.sum()), 4),
        "rejected": len(scan.rejected),
        "skew": skew,
        "heldout": {k: v["utterances"] for k, v in global_records.items()},
        "scan": scan.stats,
    }
    run.summary.update(summary)
    return summary
