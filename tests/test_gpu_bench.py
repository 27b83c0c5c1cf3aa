"""benchmarks/gpu.py: its analytic FLOP count against hand calculations, and `--smoke`, which runs every part of the
GPU benchmark on CPU at tiny sizes through the same code, so that the one call on a lent GPU cannot fail for a typo."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedhubert.config import load_config
from fedhubert.model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
TINY = load_config(ModelConfig, None, ["preset=tiny"])
BASE = load_config(ModelConfig, None, ["preset=base"])


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def test_one_transformer_layer_of_base_by_hand():
    """100 frames of HuBERT Base (d = 768, FFN 3072): Q, K, V and output projections 4 x 2 x 100 x 768 x 768;
    scores and weighted sum 2 x 2 x 100^2 x 768 over the 12 heads of 64; FFN 2 x 2 x 100 x 768 x 3072."""
    projections = 471_859_200
    attention = 30_720_000
    feed_forward = 943_718_400
    assert bench.transformer_layer_flops(100, 768, 3072) == projections + attention + feed_forward == 1_446_297_600


def test_a_second_of_tiny_by_hand():
    """1 s (16,000 samples) of the tiny preset: CNN frames 3199, 1599, 799, 399, 199, 99, 49 of 32 channels;
    2 layers of d = 64, FFN 128 over 49 frames; K = 100, final_dim 32; no layer drop."""
    cnn = 2 * 32 * 1 * 10 * 3199 + 2 * 32 * 32 * 3 * (1599 + 799 + 399 + 199) + 2 * 32 * 32 * 2 * (99 + 49)
    assert cnn == 21_060_992
    layer = 8 * 49 * 64 * 64 + 4 * 49 * 49 * 64 + 4 * 49 * 64 * 128
    expected = {
        "cnn": cnn,
        "feature_projection": 2 * 49 * 32 * 64,
        "positional_convolution": 2 * 49 * 64 * (64 // 4) * 16,
        "transformer": 2 * layer,
        "final_projection": 2 * 49 * 64 * 32,
        "logits": 2 * 49 * 100 * 32,
    }
    assert bench.forward_flops(TINY, 16000, 100) == pytest.approx(expected)
    assert sum(expected.values()) == 31_033_472
    assert bench.training_flops_per_audio_second(TINY, 16000, 100) == pytest.approx(3 * 31_033_472)


def test_base_counts_the_layers_layer_drop_leaves():
    """Base drops each layer with probability 0.05 while training: the count is 0.95 x 12 layers; a training step
    of the recipe's 15.625 s crops is about 45 GFLOP per second of audio (781 frames a crop)."""
    flops = bench.forward_flops(BASE, 250_000, 100)
    assert flops["transformer"] == pytest.approx(12 * 0.95 * bench.transformer_layer_flops(781, 768, 3072))
    assert 40e9 < bench.training_flops_per_audio_second(BASE, 250_000, 100) < 50e9


def test_the_datasheet_peak_is_found_by_the_gpu_name():
    assert bench.datasheet_peak("NVIDIA H200") == ("NVIDIA H200 (SXM)", 989.0)
    assert bench.datasheet_peak("NVIDIA H100 80GB HBM3") == ("NVIDIA H100 SXM", 989.0)
    assert bench.datasheet_peak("NVIDIA H100 PCIe") == ("NVIDIA H100 PCIe", 756.0)
    assert bench.datasheet_peak("NVIDIA A100-SXM4-80GB") == ("NVIDIA A100", 312.0)
    assert bench.datasheet_peak("NVIDIA H100 NVL") is None and bench.datasheet_peak("Tesla V100") is None


def test_the_batch_search_doubles_then_bisects():
    fits = 37
    probe = lambda n: bench.Probe(n, n <= fits, n, 0.0)  # noqa: E731
    best, probes, how = bench.largest_batch(probe, 5, 1000, bench.Budget(math.inf), reserve=0.0)
    assert (best.crops, how) == (37, "found")
    assert [p.crops for p in probes][:5] == [5, 10, 20, 40, 30]
    best, _, how = bench.largest_batch(probe, 5, 16, bench.Budget(math.inf), reserve=0.0)
    assert (best.crops, how) == (16, "limit")


@pytest.mark.slow
def test_smoke_runs_every_part_on_cpu(tmp_path):
    real = ROOT / "benchmarks" / "results" / "gpu.json"
    before = real.read_bytes() if real.exists() else None
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    record = json.loads(out.read_text())
    assert (real.read_bytes() if real.exists() else None) == before, "a smoke run never touches results/"
    assert record["benchmark"] == "gpu" and record["smoke"] is True
    assert {name: part["status"] for name, part in record["parts"].items()} == dict.fromkeys(bench.PARTS, "ok")
    for name in bench.PARTS:
        figures = [f for f in record["figures"] if f["part"] == name]
        assert figures, f"part {name} produced no figure"
        for figure in figures:
            assert isinstance(figure["ours"], float) and math.isfinite(figure["ours"]), figure
            assert figure.get("met") is None, "a smoke run gives no verdict"
    environment = record["environment"]
    assert environment["device"] == "cpu smoke" and environment["cuda_usable"] is False
    assert environment["torch"] and environment["torchaudio"] and environment["python"]
    assert environment["pins"] == {"torch": "2.8.0", "torchaudio": "2.8.0"}
    assert record["install"] is None, "a smoke run installs nothing"
    assert record["machine"]["cores"] and record["machine"]["packages"]["torch"]
    flops = record["parts"]["throughput"]["details"]["flops"]
    assert flops["training_per_audio_second"] == pytest.approx(3 * 31_033_472), "the hand count of tiny at 1 s"
    names = " ".join(f["figure"] for f in record["figures"])
    for expected in (
        "MFU",
        "largest batch",
        "checkpointed layers + CNN",
        "loader workers",
        "federated round 2",
        "attention",
        "torch.compile",
    ):
        assert expected in names
    assert record["parts"]["federated"]["details"]["rounds"]["clients_at_once"] >= 1
