"""`fedhubert evaluate speech-commands`: real S3PRL speech_commands runs on the synthetic set with our exported
teacher and student, the results table, the checks made before S3PRL starts, and an S3PRL failure."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from common import EVAL_SHORT as SHORT, run_cli
from fedhubert.eval.confidence import accuracy_interval, wilson_interval
from fedhubert.eval.config import SpeechCommandsConfig
from fedhubert.eval.results import result_markdown
from fedhubert.eval.speech_commands import prepare_upstream
from fedhubert.eval.speech_commands_format import TEST_DIR, TRAIN_DIR


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("name, upstream", [("teacher", "hubert_local"), ("student", "distiller_local")])
def test_s3prl_trains_and_tests_our_exported_upstream(evaluations, tiny_teacher, distilled, name, upstream):
    out = evaluations / name
    result = json.loads((out / "result.json").read_text())
    checkpoint = tiny_teacher if name == "teacher" else distilled / "checkpoints" / "final.pt"
    assert (result["upstream"], result["checkpoint_sha256"], result["steps"]) == (upstream, sha256(checkpoint), 4)
    # S3PRL ran our export: its recorded arguments name the upstream and our exported file.
    args = yaml.safe_load(next((out / "s3prl").glob("args_*.yaml")).read_text())
    assert (args["upstream"], Path(args["upstream_ckpt"])) == (upstream, out / "upstream.pt")
    # The accuracies are S3PRL's own, read from its log: the last dev best, and the test score of that checkpoint.
    s3prl_log = (out / "s3prl" / "log.log").read_text()
    best = re.findall(r"New best on dev at step (\d+): ([0-9.]+)", s3prl_log)[-1]
    assert result["dev_best"] == {"step": int(best[0]), "acc": float(best[1])}
    tested = re.findall(r"^test at step 0: ([0-9.]+)$", s3prl_log, re.MULTILINE)
    assert len(tested) == 1 and result["test_acc"] == float(tested[0])
    truth = (out / "s3prl" / "test_truth.txt").read_text().splitlines()
    assert len(truth) == result["data"]["test_clips"], "S3PRL scored every clip of the separate test set"
    assert 0.0 <= result["test_acc"] <= 1.0 and (out / "s3prl" / "dev-best.ckpt").is_file()
    # 95% intervals over the clips scored; S3PRL's dev set is its dev clips plus the background-noise files.
    correct = round(result["test_acc"] * len(truth))
    assert correct == pytest.approx(result["test_acc"] * len(truth), abs=1e-6)
    assert result["test_ci95"] == pytest.approx(wilson_interval(correct, len(truth)), abs=1e-4)
    dev = len((out / "s3prl" / "dev_truth.txt").read_text().splitlines())
    assert dev == result["data"]["dev_clips"] + result["data"]["noise_files"]
    assert result["dev_ci95"] == pytest.approx(accuracy_interval(result["dev_best"]["acc"], dev), abs=1e-4)
    assert "| test acc | test 95% CI | clips dev / test |" in (out / "result.md").read_text()


@pytest.mark.slow
def test_evaluations_share_one_results_table(evaluations):
    rows = [json.loads(line) for line in (evaluations / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["teacher", "student"]
    table = (evaluations / "results.md").read_text()
    for row in rows:
        assert f"| {row['name']} | {row['upstream']} | `{row['checkpoint_sha256'][:12]}` | 4 |" in table
        assert f"{100 * row['test_acc']:.2f}%" in table


def test_wilson_intervals_match_hand_computed_values():
    """Wilson: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n), z = 1.96.
    50/100: z^2/n = 0.0384, centre 0.5, half-width 1.96 * 0.05095 / 1.0384 = 0.0962 -> (0.404, 0.596).
    0/10: z^2/n = 0.384, centre 0.192 / 1.384 = 0.1388, half-width the same -> (0, 0.278)."""
    assert wilson_interval(50, 100) == pytest.approx((0.404, 0.596), abs=5e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.278), abs=5e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.722, 1.0), abs=5e-4)
    assert accuracy_interval(0.4999, 100) == wilson_interval(50, 100), "the count is rounded back from the accuracy"
    for bad in ((1, 0), (-1, 10), (11, 10)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_results_written_before_intervals_still_render():
    old = {
        "name": "old",
        "upstream": "fbank",
        "steps": 4,
        "dev_best": {"step": 2, "acc": 0.5},
        "test_acc": 0.5,
        "data": {"root": "/d", "dev_clips": 100, "test_clips": 100},
    }
    bare = {"name": "bare", "upstream": "fbank", "steps": 4, "dev_best": {"step": 2, "acc": 0.5}, "test_acc": 0.5}
    table = result_markdown([old, bare])
    assert "| old | fbank | - | 4 | 50.00% (2) | 40.4-59.6% | 50.00% | 40.4-59.6% | 100 / 100 |" in table
    assert "| bare | fbank | - | 4 | 50.00% (2) | - | 50.00% | - | - / - |" in table


def test_random_init_keeps_the_architecture_and_replaces_the_weights(tiny_teacher, tiny_speech_commands, tmp_path):
    def upstream(random_init: bool) -> dict:
        out = tmp_path / str(random_init)
        out.mkdir()
        cfg = SpeechCommandsConfig(dataset=tiny_speech_commands, checkpoint=tiny_teacher, random_init=random_init)
        info = prepare_upstream(cfg, out)
        assert info["upstream"] == "hubert_local" and sorted(p.name for p in out.iterdir()) == [
            "upstream.pt",
            "upstream.pt.json",
        ], "the random-init copy is not left behind"
        return torch.load(out / "upstream.pt", weights_only=True)

    trained, fresh = upstream(False), upstream(True)
    assert trained["model_cfg"] == fresh["model_cfg"]
    weights = trained["model_weight"]
    assert weights.keys() == fresh["model_weight"].keys()
    changed = [k for k in weights if not torch.equal(weights[k], fresh["model_weight"][k])]
    assert len(changed) > 0.8 * len(weights)


@pytest.fixture
def dataset_copy(tiny_speech_commands, tmp_path) -> Path:
    root = tmp_path / "speech_commands"
    for name in (TRAIN_DIR, TEST_DIR):
        shutil.copytree(tiny_speech_commands / name, root / name)
    return root


def _break_missing_keyword(root: Path) -> str:
    shutil.rmtree(root / TRAIN_DIR / "left")
    return "has no clips of ['left']"


def _break_no_noise(root: Path) -> str:
    shutil.rmtree(root / TRAIN_DIR / "_background_noise_")
    (root / TRAIN_DIR / "_background_noise_").mkdir()
    return "_background_noise_ holds no .wav"


def _break_no_test_set(root: Path) -> str:
    shutil.rmtree(root / TEST_DIR)
    return f"{TEST_DIR} does not exist"


def _break_corrupt_clip(root: Path) -> str:
    clip = sorted((root / TEST_DIR / "yes").glob("*.wav"))[0]
    clip.write_bytes(b"not a wav file at all")
    return f"cannot read the header of {clip}"


def _break_empty_clip(root: Path) -> str:
    import soundfile as sf

    clip = sorted((root / TRAIN_DIR / "no").glob("*.wav"))[0]
    sf.write(clip, [], 16000)
    return f"{clip}: empty (no samples)"


@pytest.mark.parametrize(
    "damage", [_break_missing_keyword, _break_no_noise, _break_no_test_set, _break_corrupt_clip, _break_empty_clip]
)
def test_a_bad_dataset_stops_before_s3prl_with_the_problem_named(dataset_copy, tmp_path, capsys, damage):
    expected = damage(dataset_copy)
    out = tmp_path / "eval"
    assert (
        run_cli("evaluate", "speech-commands", "--dataset", dataset_copy, "--baseline", "fbank", "--out", out, *SHORT)
        == 2
    )
    assert expected in capsys.readouterr().err
    assert not (out / "s3prl.log").exists() and not (out / "s3prl").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_a_checkpoint_of_the_wrong_kind_is_refused(tiny_teacher, tiny_speech_commands, tmp_path, capsys):
    export = tmp_path / "teacher_s3prl.pt"
    assert run_cli("export", "--checkpoint", tiny_teacher, "--format", "s3prl-hubert", "--out", export) == 0
    capsys.readouterr()
    args = ["evaluate", "speech-commands", "--dataset", tiny_speech_commands, *SHORT]
    assert run_cli(*args, "--checkpoint", export, "--out", tmp_path / "a") == 2
    assert (
        f"is an S3PRL export, not a fedhubert checkpoint: pass the checkpoint it was exported from "
        f"({tiny_teacher})" in capsys.readouterr().err
    )
    assert run_cli(*args, "--checkpoint", tmp_path / "nowhere.pt", "--out", tmp_path / "b") == 2
    assert f"checkpoint {tmp_path / 'nowhere.pt'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--baseline", "fbank", "--checkpoint", "x.pt"], "give exactly one of 'checkpoint'"),
        (["--baseline", "wav2vec2"], "key 'baseline' must be one of 'fbank', 'mfcc', 'spectrogram'"),
        (["--baseline", "fbank", "--eval-step", "10"], "eval_step (10) is above total_steps (4)"),
        (["--baseline", "fbank", "--random-init"], "key 'random_init' needs a checkpoint"),
        (["--baseline", "fbank", "bacth_size=3"], "bacth_size"),
    ],
)
def test_config_mistakes_are_named(tiny_speech_commands, tmp_path, capsys, overrides, message):
    assert (
        run_cli(
            "evaluate",
            "speech-commands",
            "--dataset",
            tiny_speech_commands,
            "--out",
            tmp_path / "e",
            *SHORT,
            *overrides,
        )
        == 2
    )
    assert message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_asking_for_a_missing_gpu_stops_before_s3prl(tiny_speech_commands, tmp_path, capsys):
    assert (
        run_cli(
            "evaluate",
            "speech-commands",
            "--dataset",
            tiny_speech_commands,
            "--baseline",
            "fbank",
            "--out",
            tmp_path / "e",
            *SHORT,
            "device=cuda",
        )
        == 2
    )
    assert "torch sees no CUDA GPU here; use device=cpu or auto" in capsys.readouterr().err


@pytest.mark.slow
def test_when_s3prl_dies_its_log_is_kept_and_its_last_lines_shown(tiny_speech_commands, tmp_path):
    """S3PRL killed mid-training (as by an out-of-memory killer): a clear failure, not a missing result."""
    out = tmp_path / "eval"
    env = {**os.environ, "FEDHUBERT_PROGRESS": "0"}
    command = [
        str(Path(sys.executable).parent / "fedhubert"),
        "evaluate",
        "speech-commands",
        "--dataset",
        str(tiny_speech_commands),
        "--baseline",
        "fbank",
        "--out",
        str(out),
        "--steps",
        "100000",
        "--eval-step",
        "50000",
        "batch_size=8",
        "num_workers=0",
        "device=cpu",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        log_text = (out / "s3prl.log").read_text() if (out / "s3prl.log").is_file() else ""
        if "Start a new experiment" in log_text:
            break
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("S3PRL did not start within 2 minutes")
    s3prl = [
        p
        for p in psutil.Process(process.pid).children(recursive=True)
        if "s3prl.run_downstream" in " ".join(p.cmdline())
    ]
    assert len(s3prl) == 1
    s3prl[0].send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert f"S3PRL's run_downstream failed (exit -9); its log is {out / 's3prl.log'}. Last lines:" in stderr
    last = [line for line in (out / "s3prl.log").read_text().splitlines() if line.strip()][-1]
    assert last.strip() in stderr, "the last lines of S3PRL's log are shown"
    assert (out / "s3prl.log").is_file() and not (out / "result.json").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
