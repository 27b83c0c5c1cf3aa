"""Storage faults: a checkpoint corrupted or truncated on disk is detected by its checksum and the previous one is
used, with a warning; a disk that fills up while a checkpoint or labels are written leaves the earlier files intact
and stops with an error that says what to do. The full disk is a small tmpfs (mounting needs root: elsewhere these
drills are skipped, with the reason)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from common import run_cli
from fedhubert.config import load_config
from fedhubert.labels.kmeans import write_label_file
from fedhubert.manifest import read_manifest
from fedhubert.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedhubert.model.config import ModelConfig

TINY = load_config(ModelConfig, None, ["preset=tiny"])


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of a few MiB, unmounted afterwards."""
    mounted = []

    def mount(size_kib: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(
                f"cannot mount a small tmpfs here ({result.stderr.strip() or 'mount failed'}); "
                "run as root to drill a full disk"
            )
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave_kib: int) -> None:
    """Take all but `leave_kib` of the disk's free space."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as handle:
        handle.write(b"\0" * max(free - leave_kib * 1024, 0))


def copy_run(run: Path, target: Path, upto_round: int) -> Path:
    """A copy of a finished run as it was after `upto_round` (later checkpoints and the final one removed)."""
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("flwr", "tensorboard", "*.png"))
    for path in (target / "checkpoints").glob("*.pt*"):
        name = path.name.split(".")[0]
        if name in ("final", "best") or (name.startswith("round_") and int(name[6:]) > upto_round):
            path.unlink()
    return target


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning_and_the_run_ends_the_same(
    four_rounds, tmp_path, intact, caplog
):
    out = copy_run(four_rounds, tmp_path / "run", upto_round=3)
    newest = out / "checkpoints" / "round_00003.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a crash or bad disk
    intact(out / "checkpoints" / "round_00002.pt")
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_checkpoint(newest)
    assert run_cli("pretrain", "--resume", out) == 0
    log = (out / "logs" / "server-pretrain.log").read_text()
    assert "skipping checkpoint round_00003.pt" in log and "checksum" in log
    assert json.loads((out / "run.json").read_text())["summary"]["resumed_after_round"] == 2
    a = load_checkpoint(four_rounds / "checkpoints" / "final.pt")["state_dict"]
    b = load_checkpoint(out / "checkpoints" / "final.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed from round 2, the run ends as the uninterrupted one"


def test_a_flipped_byte_is_caught_by_the_checksum(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, kind="hubert", model=TINY, num_classes=4, state_dict={"w": torch.ones(64, 64)})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_checkpoint(path)


def test_only_the_newest_round_checkpoints_are_kept_with_their_sidecars(tmp_path):
    """checkpoint_keep: round checkpoints beyond the newest k go with their .sha256; best.pt and final.pt stay;
    None keeps every one."""
    from fedhubert.fl.rounds import CHECKPOINTS, newest_checkpoint, prune_round_checkpoints

    folder = tmp_path / CHECKPOINTS
    for name in [f"round_{r:05d}.pt" for r in (0, 1, 2, 10, 11)] + ["best.pt", "final.pt"]:
        save_checkpoint(folder / name, kind="hubert", model=TINY, num_classes=4, state_dict={"w": torch.ones(2)})
    assert prune_round_checkpoints(tmp_path, None) == []
    gone = prune_round_checkpoints(tmp_path, 3)
    assert [p.name for p in gone] == ["round_00000.pt", "round_00001.pt"], "by round number, oldest first"
    kept = ["best.pt", "final.pt", "round_00002.pt", "round_00010.pt", "round_00011.pt"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept + [f"{k}.sha256" for k in kept])
    assert newest_checkpoint(tmp_path, "hubert")[0].name == "round_00011.pt"
    assert prune_round_checkpoints(tmp_path, 3) == []


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(small_disk, intact):
    disk = small_disk(4096)
    path = disk / "round_00001.pt"
    save_checkpoint(path, kind="hubert", model=TINY, num_classes=4, state_dict={"w": torch.zeros(256, 256)})
    intact(path, path.with_name(path.name + ".sha256"))
    fill(disk, leave_kib=64)
    with pytest.raises(CheckpointError, match="No space left on device") as caught:
        save_checkpoint(path, kind="hubert", model=TINY, num_classes=4, state_dict={"w": torch.ones(256, 256)})
    assert "Earlier checkpoints are intact" in str(caught.value) and "--resume" in str(caught.value)
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "round_00001.pt", "round_00001.pt.sha256"]
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.zeros(256, 256))


def test_a_full_disk_while_writing_labels_keeps_the_previous_labels(small_labels, small_partition, small_disk, intact):
    disk = small_disk(1024)
    manifest = read_manifest(small_partition / "client_0" / "train.tsv")
    labels = disk / "train.km"
    shutil.copy(small_labels / "client_0" / "train.km", labels)
    intact(labels)
    relabelled = [" ".join("1" for _ in line.split()) for line in labels.read_text().splitlines()]
    fill(disk, leave_kib=2)
    with pytest.raises(OSError, match="No space left on device"):
        write_label_file(labels, relabelled, manifest)
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "train.km"]


@pytest.mark.slow
def test_pretraining_on_a_full_disk_stops_clearly_and_resumes_after_space_is_freed(
    four_rounds, small_disk, tmp_path, capsys, intact
):
    disk = small_disk(16 * 1024)
    out = copy_run(four_rounds, disk / "run", upto_round=2)
    intact(out / "checkpoints")
    fill(disk, leave_kib=768)  # room for logs and metrics, not for a 1.3 MiB checkpoint
    assert run_cli("pretrain", "--resume", out) == 2
    err = capsys.readouterr().err
    assert "cannot write checkpoint" in err and "No space left on device" in err and "--resume" in err
    assert not list((out / "checkpoints").glob(".*.tmp")), "no half-written file is left behind"
    (disk / "filler").unlink()
    assert run_cli("pretrain", "--resume", out) == 0
    a = load_checkpoint(four_rounds / "checkpoints" / "final.pt")["state_dict"]
    b = load_checkpoint(out / "checkpoints" / "final.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
