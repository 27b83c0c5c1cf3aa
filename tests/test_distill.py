"""`fedhubert distill`: the frozen teacher, the DistilHuBERT student, a real Flower run, and the S3PRL export."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import soundfile as sf
import torch

from common import DISTILL_FAST as FAST, rows, run_cli
from fedhubert.config import load_config
from fedhubert.distill.config import DistillLossConfig, StudentConfig
from fedhubert.distill.models import build_student, distiller_config, load_teacher, prediction_layers
from fedhubert.errors import ConfigError
from fedhubert.fl.records import read_messages
from fedhubert.manifest import read_manifest
from fedhubert.model.checkpoint import CheckpointError, load_checkpoint, model_config_of, save_checkpoint
from fedhubert.model.config import ModelConfig
from fedhubert.model.hubert import build_hubert, hidden_states
from fedhubert.model.student import Student, init_from_teacher


def test_the_teacher_is_the_checkpoints_model_and_frozen(tiny_teacher):
    teacher, cfg, payload = load_teacher(tiny_teacher)
    reference = build_hubert(model_config_of(payload), payload["num_classes"])
    reference.load_state_dict(payload["state_dict"])
    reference.eval()
    wav = torch.randn(2, 24000) * 0.1
    with torch.no_grad():
        for a, b in zip(
            hidden_states(teacher, wav, None, False), hidden_states(reference, wav, None, False), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_a_client_reloads_the_teacher_only_when_its_file_changes(tiny_teacher, tmp_path):
    from fedhubert.distill.client import teacher

    path = tmp_path / "teacher.pt"
    shutil.copy(tiny_teacher, path)
    first = teacher(path)
    assert teacher(path) is first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert teacher(path) is not first


def test_a_missing_or_wrong_teacher_stops_with_a_clear_error(small_partition, tmp_path, capsys):
    assert (
        run_cli("distill", "--teacher", tmp_path / "none.pt", "--partition", small_partition, "--out", tmp_path / "a")
        == 2
    )
    assert f"checkpoint {tmp_path / 'none.pt'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "a" / "flwr").exists(), "stopped before any Flower run"
    student_ckpt = tmp_path / "student.pt"
    save_checkpoint(student_ckpt, kind="distiller", model={"distiller": {}}, num_classes=0, state_dict={})
    with pytest.raises(CheckpointError, match="holds a 'distiller' model, not the 'hubert' one"):
        load_teacher(student_ckpt)
    with pytest.raises(ConfigError, match=r"teacher layers \[5\], but the teacher has 2"):
        prediction_layers(StudentConfig(pred_layers=[1, 5]), load_config(ModelConfig, None, ["preset=tiny"]))
    assert prediction_layers(StudentConfig(), load_config(ModelConfig)) == [4, 8, 12]


def test_the_student_starts_from_the_teachers_cnn_and_layers(tiny_teacher):
    teacher, cfg, _ = load_teacher(tiny_teacher)
    student = build_student(distiller_config(StudentConfig(), cfg, [1, 2], 1.0), DistillLossConfig())
    copied = init_from_teacher(student, teacher.state_dict())
    state, teacher_state = student.distiller.state_dict(), teacher.state_dict()
    assert torch.equal(
        state["feature_extractor.conv_layers.0.0.weight"],
        teacher_state["wav2vec2.feature_extractor.conv_layers.0.conv.weight"],
    )
    assert torch.equal(
        state["encoder.layers.1.fc2.weight"],
        teacher_state["wav2vec2.encoder.transformer.layers.1.feed_forward.output_dense.weight"],
    )
    assert not any(k.startswith("output_layer") for k in copied)


@pytest.mark.slow
def test_federated_distillation_lowers_the_loss_and_changes_only_the_student(distilled, tiny_teacher):
    evals = rows(distilled, "eval")
    assert [r["round"] for r in evals] == [0, 1, 2] and evals[-1]["loss"] < evals[0]["loss"]
    assert all("l1" in r and "cos" in r for r in evals)
    final = load_checkpoint(distilled / "checkpoints" / "final.pt", kind="distiller")
    assert final["model"]["teacher"]["sha256"] == hashlib.sha256(tiny_teacher.read_bytes()).hexdigest()
    assert set(final["state_dict"]) == {k for k in final["state_dict"] if k.startswith("distiller.")}
    teacher, cfg, _ = load_teacher(tiny_teacher)
    torch.manual_seed(0)
    initial = build_student(final["model"]["distiller"], DistillLossConfig())
    init_from_teacher(initial, teacher.state_dict())
    changed = [k for k, v in initial.state_dict().items() if not torch.equal(v, final["state_dict"][k])]
    assert len(changed) > 0.8 * len(final["state_dict"]), "the student learned"
    for message in read_messages(distilled / "messages.jsonl"):
        if message["type"] == "train.distill":
            assert all(name.split(".", 1)[1].startswith("distiller.") for name in message["arrays"]), (
                "only the student travels"
            )
            assert {a["dtype"] for a in message["arrays"].values()} == {"float32"}


@pytest.mark.slow
def test_distiller_export_loads_in_s3prl_and_matches_our_student(distilled, small_partition, tmp_path):
    import s3prl.hub as hub

    exported = tmp_path / "student_s3prl.pt"
    assert (
        run_cli(
            "export",
            "--checkpoint",
            distilled / "checkpoints" / "final.pt",
            "--format",
            "s3prl-distiller",
            "--out",
            exported,
        )
        == 0
    )
    payload = load_checkpoint(distilled / "checkpoints" / "final.pt")
    ours = Student(payload["model"]["distiller"])
    ours.load_state_dict(payload["state_dict"])
    ours.eval()
    upstream = hub.distiller_local(ckpt=str(exported)).eval()
    manifest = read_manifest(small_partition / "client_1" / "train.tsv")
    for i in range(2):
        wav = torch.from_numpy(sf.read(manifest.audio_path(i), dtype="float32")[0])
        with torch.no_grad():
            theirs = upstream([wav])["hidden_states"]
        mine = ours.hidden_states(wav[None])
        assert len(theirs) == len(mine)
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (
        run_cli(
            "export",
            "--checkpoint",
            distilled / "checkpoints" / "final.pt",
            "--format",
            "s3prl-hubert",
            "--out",
            tmp_path / "wrong.pt",
        )
        == 2
    ), "a student is not a HuBERT"


@pytest.mark.slow
def test_the_kmeans_term_trains_a_label_head_too(tiny_teacher, small_partition, small_kmeans, tmp_path):
    out = tmp_path / "with-kmeans"
    assert (
        run_cli(
            "distill",
            "--teacher",
            tiny_teacher,
            "--partition",
            small_partition,
            "--kmeans",
            small_kmeans,
            "--out",
            out,
            "--rounds",
            "1",
            *FAST,
            "loss.kmeans_weight=0.5",
        )
        == 0
    )
    [aggregated] = rows(out, "train")
    assert 0 <= aggregated["train_acc_masked"] <= 1
    final = load_checkpoint(out / "checkpoints" / "final.pt")
    assert {"mask_emb", "label_embeddings", "label_proj.weight"} <= set(final["state_dict"])
    assert (
        run_cli(
            "export",
            "--checkpoint",
            out / "checkpoints" / "final.pt",
            "--format",
            "s3prl-distiller",
            "--out",
            tmp_path / "s.pt",
        )
        == 0
    ), "the label head is left out of the export"
