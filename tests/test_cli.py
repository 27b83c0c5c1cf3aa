"""The command line as a user meets it: help, config errors without tracebacks, output folders, missing tools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from common import run_cli


def fedhubert(*args: str | Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedhubert", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_help_lists_the_stages_and_the_config_keys():
    top = fedhubert("--help")
    assert top.returncode == 0 and "synth" in top.stdout
    synth = fedhubert("synth", "librispeech", "--help")
    assert synth.returncode == 0
    assert "config keys" in synth.stdout and "other_snr_db" in synth.stdout and "--speakers" in synth.stdout


def test_bad_config_stops_with_one_clear_line_and_no_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("speakers: 4\nminuts: 3\n")
    result = fedhubert("synth", "librispeech", "--out", tmp_path / "corpus", "--config", config)
    assert result.returncode == 2
    assert "unknown key 'minuts'" in result.stderr and str(config) in result.stderr
    assert "did you mean 'minutes'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "corpus").exists(), "nothing is written when the config is bad"


def test_flag_out_of_range_is_reported_as_an_override(tmp_path):
    result = fedhubert("synth", "speech-commands", "--out", tmp_path / "sc", "--speakers", "1")
    assert result.returncode == 2 and "key 'speakers' must be >= 3, got 1" in result.stderr


def test_every_command_line_mistake_is_reported_at_once_naming_the_flags_typed(tmp_path):
    result = fedhubert(
        "partition",
        "--out",
        tmp_path / "p",
        "--corpus",
        tmp_path,
        "--clients",
        "four",
        "--scheme",
        "random",
        "train_subsets=train-clean-100",
        "model.layers=2",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "4 config mistakes:" in result.stderr
    assert "--clients: key 'num_clients' must be an integer (or null), got 'four'" in result.stderr
    assert "--scheme: key 'scheme' must be one of" in result.stderr
    assert "write train_subsets=[train-clean-100]" in result.stderr
    assert "unknown key 'model'" in result.stderr
    assert "num_clients=four" not in result.stderr
    assert not (tmp_path / "p").exists()


def test_evaluate_steps_shorten_the_eval_and_log_steps_left_unset(tmp_path):
    args = ["evaluate", "speech-commands", "--out", tmp_path / "e", "--dataset", tmp_path, "--baseline", "fbank"]
    short = yaml.safe_load(fedhubert(*args, "--steps", "40", "--print-config").stdout)
    assert (short["total_steps"], short["eval_step"], short["log_step"]) == (40, 4, 1)
    chosen = yaml.safe_load(fedhubert(*args, "--steps", "40", "--eval-step", "20", "--print-config").stdout)
    assert (chosen["eval_step"], chosen["log_step"]) == (20, 1)


def test_print_config_shows_the_resolved_config(tmp_path):
    result = fedhubert(
        "synth", "librispeech", "--out", tmp_path / "x", "--seed", "4", "subsets.dev-other=1", "--print-config"
    )
    assert result.returncode == 0
    resolved = yaml.safe_load(result.stdout)
    assert resolved["seed"] == 4 and resolved["subsets"]["dev-other"] == 1.0
    assert not (tmp_path / "x").exists()


def test_existing_output_is_refused_without_force_and_only_our_files_are_replaced(tmp_path):
    out = tmp_path / "sc"
    args = [
        "synth",
        "speech-commands",
        "--out",
        out,
        "--speakers",
        "3",
        "--test-speakers",
        "1",
        "auxiliary_words=[cat]",
        "noise_seconds=2",
        "keyword_repetitions=[1,1]",
    ]
    assert run_cli(*args) == 0
    keep = out / "my_notes.txt"
    keep.write_text("mine")
    refused = fedhubert(*args)
    assert refused.returncode == 2 and "--force" in refused.stderr and "not empty" in refused.stderr
    assert run_cli(*args, "--force", "--seed", "9") == 0
    assert keep.read_text() == "mine"
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 9


def test_missing_espeak_names_the_install_command(tmp_path):
    result = fedhubert(
        "synth", "librispeech", "--out", tmp_path / "c", "--speakers", "5", env={"PATH": str(tmp_path / "empty-bin")}
    )
    assert result.returncode == 2
    assert "espeak-ng was not found" in result.stderr and "apt-get install espeak-ng" in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads((tmp_path / "c" / "run.json").read_text())["status"] == "failed"
    # Once espeak-ng is there, the same command runs again without --force: a failed run's outputs are replaced.
    assert run_cli("synth", "librispeech", "--out", tmp_path / "c", "--speakers", "5", "--minutes", "0.05") == 0
    assert json.loads((tmp_path / "c" / "run.json").read_text())["status"] == "completed"
