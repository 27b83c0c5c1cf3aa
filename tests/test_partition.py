"""`fedhubert partition` end to end on real (synthetic) audio: manifests, splits, records, bad input, cache."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from common import run_cli
from fedhubert.manifest import file_sha256, read_aligned_lines, read_manifest
from test_synth_librispeech import speakers_table, transcripts, tree_digest

TRAIN = ("train-clean-100", "train-clean-360", "train-other-500")


def partition(corpus: Path, out: Path, *args: str, cache: Path | None = None) -> int:
    cache_args = [f"cache_dir={cache}"] if cache else ["use_cache=false"]
    return run_cli("partition", "--corpus", corpus, "--out", out, "--workers", "2", *cache_args, *args)


def corpus_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def client_rows(out: Path) -> dict[str, list[tuple[str, int, str]]]:
    """split name -> (path, num_samples, transcript) over all clients."""
    rows: dict[str, list] = {"train": [], "valid": []}
    for folder in sorted(out.glob("client_[0-9]*")):
        if not folder.is_dir():
            continue
        for split in rows:
            manifest = read_manifest(folder / f"{split}.tsv")
            words = read_aligned_lines(folder / f"{split}.wrd", manifest)
            rows[split] += [(e.path, e.num_samples, w) for e, w in zip(manifest.entries, words, strict=True)]
    return rows


@pytest.mark.parametrize(
    "scheme, extra",
    [
        ("balanced", []),
        ("dirichlet", ["dirichlet.alpha=0.3", "dirichlet.attribute=subset"]),
        ("quantity", ["quantity.exponent=1.5"]),
        ("natural", ["num_clients=null", "natural.speakers_per_client=2"]),
    ],
)
def test_every_accepted_utterance_lands_once_with_its_true_length_and_transcript(
    small_librispeech, tmp_path, scheme, extra
):
    out = tmp_path / "part"
    clients = [] if scheme == "natural" else ["--clients", "4"]
    assert partition(small_librispeech, out, "--scheme", scheme, *clients, *extra) == 0
    info = json.loads((out / "partition.json").read_text())
    texts = transcripts(small_librispeech)
    table = speakers_table(small_librispeech)
    expected = {
        p.relative_to(small_librispeech).as_posix() for s in TRAIN for p in small_librispeech.glob(f"{s}/*/*/*.flac")
    }
    rows = client_rows(out)
    paths = [p for split in rows.values() for p, _, _ in split]
    assert sorted(paths) == sorted(expected), "every accepted training utterance exactly once"
    for path, num_samples, words in rows["train"] + rows["valid"]:
        assert num_samples == sf.read(small_librispeech / path)[0].shape[0], "num_samples is the true length"
        assert words == texts[Path(path).stem]
    owners = {}
    for c in info["clients"]:
        for speaker in c["speakers"]:
            assert speaker not in owners, "speaker-disjoint clients"
            owners[speaker] = c["client"]
        for split in ("train", "valid"):
            spk = {int(p.split("/")[1]) for p, _, _ in client_rows_of(out / c["dir"], split)}
            assert spk <= set(c["speakers"])
        for name, digest in c["manifests"].items():
            assert file_sha256(out / c["dir"] / name) == digest
        assert (out / "client_configs" / f"{c['dir']}.yaml").is_file()
    assert set(owners) == {s for s, r in table.items() if r["subset"] in TRAIN}
    if scheme == "natural":
        assert info["num_clients"] == 5 and max(len(c["speakers"]) for c in info["clients"]) == 2
    else:
        assert info["num_clients"] == 4
    assert (out / "summary.md").read_text().count("\n| ") >= info["num_clients"]
    assert (out / "clients.png").read_bytes()[:4] == b"\x89PNG"


def client_rows_of(folder: Path, split: str) -> list[tuple[str, int, str]]:
    manifest = read_manifest(folder / f"{split}.tsv")
    return [(e.path, e.num_samples, "") for e in manifest.entries]


def test_manifest_format_is_fairseq_and_heldout_sets_are_global(small_librispeech, tmp_path):
    out = tmp_path / "part"
    assert partition(small_librispeech, out, "--clients", "3") == 0
    lines = (out / "client_0" / "train.tsv").read_text().splitlines()
    assert lines[0] == str(small_librispeech.resolve())
    for line in lines[1:]:
        rel, samples = line.split("\t")
        assert (small_librispeech / rel).is_file() and int(samples) > 0
    info = json.loads((out / "partition.json").read_text())
    assert set(info["heldout"]) == {"dev-clean", "dev-other", "test-clean"}, "test-other is absent and skipped"
    for subset in info["heldout"]:
        manifest = read_manifest(out / "global" / f"{subset}.tsv")
        assert {Path(e.path).parts[0] for e in manifest.entries} == {subset}
        assert len(read_aligned_lines(out / "global" / f"{subset}.wrd", manifest)) == len(manifest)


def test_validation_split_by_speaker_or_by_utterance(small_librispeech, tmp_path):
    out = tmp_path / "by-speaker"
    assert (
        partition(small_librispeech, out, "--clients", "2", "validation.min_speakers=3", "validation.fraction=0.3") == 0
    )
    for c in json.loads((out / "partition.json").read_text())["clients"]:
        assert c["valid_split"] == "speaker" and c["valid_speakers"]
        valid = {int(e.path.split("/")[1]) for e in read_manifest(out / c["dir"] / "valid.tsv").entries}
        train = {int(e.path.split("/")[1]) for e in read_manifest(out / c["dir"] / "train.tsv").entries}
        assert valid == set(c["valid_speakers"]) and not valid & train
    out = tmp_path / "by-utterance"
    assert partition(small_librispeech, out, "--clients", "5", "validation.min_speakers=10") == 0
    for c in json.loads((out / "partition.json").read_text())["clients"]:
        assert c["valid_split"] == "utterance" and c["utterances"]["valid"] >= 1


def test_same_seed_same_partition_and_the_corpus_is_untouched(small_librispeech, tmp_path):
    before = corpus_digest(small_librispeech)
    for name in ("a", "b"):
        assert (
            partition(small_librispeech, tmp_path / name, "--scheme", "dirichlet", "--clients", "4", "--seed", "7") == 0
        )
    assert partition(small_librispeech, tmp_path / "c", "--scheme", "dirichlet", "--clients", "4", "--seed", "8") == 0
    digest = {n: {k: v for k, v in tree_digest(tmp_path / n).items() if not k.endswith(".png")} for n in "abc"}
    assert digest["a"] == {k: v for k, v in digest["b"].items()}
    assert (
        json.loads((tmp_path / "a" / "partition.json").read_text())["clients"]
        != json.loads((tmp_path / "c" / "partition.json").read_text())["clients"]
    )
    assert corpus_digest(small_librispeech) == before, "the corpus is read-only"


def test_existing_output_needs_force(small_librispeech, tmp_path):
    out = tmp_path / "part"
    assert partition(small_librispeech, out, "--clients", "4") == 0
    assert partition(small_librispeech, out, "--clients", "3") == 2
    assert len(list(out.glob("client_[0-9]*"))) == 4
    assert partition(small_librispeech, out, "--clients", "3", "--force") == 0
    assert sorted(p.name for p in out.glob("client_[0-9]*")) == ["client_0", "client_1", "client_2"]


def write_flac(path: Path, samples: np.ndarray, rate: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, rate, format="FLAC")


@pytest.fixture()
def damaged_corpus(small_librispeech, tmp_path) -> Path:
    """A copy of the corpus with one file of each kind of damage; the original stays untouched."""
    root = tmp_path / "damaged"
    shutil.copytree(small_librispeech, root)
    spk_dir = next((root / "train-clean-100").iterdir())
    chapter = next(spk_dir.iterdir())
    stem = f"{spk_dir.name}-{chapter.name}"
    speech = sf.read(next(chapter.glob("*.flac")))[0]
    (chapter / f"{stem}-0900.flac").write_bytes(b"this is not a flac file" * 20)
    subprocess.run(
        ["sox", "-n", "-r", "16000", "-c", "1", "-b", "16", chapter / f"{stem}-0901.flac", "trim", "0", "0"], check=True
    )  # a valid FLAC without samples (and without a length in its header)
    write_flac(chapter / f"{stem}-0902.flac", speech[::2], rate=8000)
    write_flac(chapter / f"{stem}-0903.flac", np.stack([speech, speech], axis=1))
    write_flac(chapter / f"{stem}-0904.flac", speech)  # no transcript line
    write_flac(chapter / "stray.flac", speech)
    with open(chapter / f"{stem}.trans.txt", "a") as handle:
        for n in ("0900", "0901", "0902", "0903"):
            handle.write(f"{stem}-{n} SOME WORDS\n")
    write_flac(root / "train-clean-360" / "77" / "1" / "77-1-0000.flac", speech)  # speaker not in SPEAKERS.TXT
    (root / "train-clean-360" / "77" / "1" / "77-1.trans.txt").write_text("77-1-0000 HELLO\n")
    return root


def test_bad_audio_is_listed_with_reasons_and_never_crashes(damaged_corpus, tmp_path):
    before = corpus_digest(damaged_corpus)
    out = tmp_path / "part"
    assert partition(damaged_corpus, out, "--clients", "3") == 0
    rejected = dict(line.split("\t") for line in (out / "rejected.tsv").read_text().splitlines()[1:])
    by_suffix = {Path(p).name.rsplit("-", 1)[-1]: reason for p, reason in rejected.items()}
    assert by_suffix["0900.flac"] == "unreadable header: Format not recognised."
    assert by_suffix["0901.flac"].startswith("unreadable header: no length in the header")
    assert by_suffix["0902.flac"] == "sample rate 8000 Hz (expected 16000)"
    assert by_suffix["0903.flac"] == "2 channels (expected mono)"
    assert by_suffix["0904.flac"].startswith("no transcript line in")
    assert by_suffix["stray.flac"].startswith("file name is not")
    assert by_suffix["0000.flac"] == "speaker 77 is not in SPEAKERS.TXT"
    info = json.loads((out / "partition.json").read_text())
    assert info["rejected"]["count"] == len(rejected) == 7
    assert "Rejected files: 7" in (out / "summary.md").read_text()
    listed = {p for split in client_rows(out).values() for p, _, _ in split}
    assert not listed & set(rejected)
    assert corpus_digest(damaged_corpus) == before


def test_truncated_audio_is_caught_when_verifying(damaged_corpus, tmp_path):
    victim = next((damaged_corpus / "train-clean-360").glob("*/*/*-0000.flac"))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    assert partition(damaged_corpus, tmp_path / "quick", "--clients", "3") == 0
    assert victim.name not in (tmp_path / "quick" / "rejected.tsv").read_text(), "headers alone cannot see it"
    assert partition(damaged_corpus, tmp_path / "verified", "--clients", "3", "verify_audio=true") == 0
    rejected = (tmp_path / "verified" / "rejected.tsv").read_text()
    assert f"{victim.name}\tundecodable" in rejected


def test_wrong_corpus_folders_give_clear_errors(small_librispeech, tmp_path, capsys):
    assert partition(tmp_path, tmp_path / "a", "--clients", "2") == 2
    assert "SPEAKERS.TXT not found" in capsys.readouterr().err
    assert (
        partition(
            small_librispeech, tmp_path / "b", "--clients", "2", "train_subsets=[test-other]", "heldout_subsets=[]"
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "training subsets ['test-other'] are not in" in err and "train-clean-100" in err
    assert partition(small_librispeech, tmp_path / "c", "--clients", "99") == 2
    assert "num_clients=99 but only" in capsys.readouterr().err


def test_unchanged_corpus_is_not_read_again(small_librispeech, tmp_path):
    cache = tmp_path / "cache"
    corpus = tmp_path / "corpus"
    shutil.copytree(small_librispeech, corpus)
    files = len(list(corpus.glob("*/*/*/*.flac")))
    assert partition(corpus, tmp_path / "cold", "--clients", "3", cache=cache) == 0
    assert partition(corpus, tmp_path / "warm", "--clients", "3", cache=cache) == 0
    cold = json.loads((tmp_path / "cold" / "run.json").read_text())["summary"]["scan"]
    warm = json.loads((tmp_path / "warm" / "run.json").read_text())["summary"]["scan"]
    assert (cold["headers_read"], cold["headers_cached"]) == (files, 0)
    assert (warm["headers_read"], warm["headers_cached"]) == (0, files)
    changed = next(corpus.glob("train-clean-100/*/*/*.flac"))
    speech = sf.read(changed)[0]
    write_flac(changed, np.concatenate([speech, speech]))
    assert partition(corpus, tmp_path / "changed", "--clients", "3", cache=cache) == 0
    scan = json.loads((tmp_path / "changed" / "run.json").read_text())["summary"]["scan"]
    assert (scan["headers_read"], scan["headers_cached"]) == (1, files - 1)
    rows = client_rows(tmp_path / "changed")
    rel = changed.relative_to(corpus).as_posix()
    assert [n for p, n, _ in rows["train"] + rows["valid"] if p == rel] == [2 * len(speech)]
    assert tree_digest(tmp_path / "cold")["client_0/train.tsv"] == tree_digest(tmp_path / "warm")["client_0/train.tsv"]
