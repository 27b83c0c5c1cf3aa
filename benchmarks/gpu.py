"""GPU figures of HuBERT Base pretraining in one call (issue 30): throughput and MFU, peak memory with and without
checkpointing, the attention kernels and torch.compile, the data pipeline, and a federated round on the one GPU.

HuBERT Base with K = 100 clusters, bf16 autocast over fp32 weights, the repository's own trainer
(`fedhubert.train.loop.train`: masked prediction, AdamW, clipping) on batches of the recipe's crops (15.625 s; the
recipe's 87.5 s of audio per batch makes 5 of them, as `batch_loader` does with long utterances: 78.1 s). Each part
runs in a process of its own with a time budget of its own (a share of --budget-s; what a part leaves unused goes to
the next), so a slow part cannot starve the rest; a part past its budget keeps what it measured and says so, and
results/gpu.json is always written. The parts, in order:

1. environment: GPU name, driver, CUDA, torch and torchaudio against the pins of requirements/requirements.in, and a
   measured bf16 matmul rate. If a GPU is there but torch cannot use it, the pinned torch and torchaudio are
   installed with pip into a fresh folder (from --wheels DIR, else the package index where one can be reached) and
   the script runs itself again on them; what happened is recorded. Without a GPU (`make bench` on a CPU machine)
   it measures nothing and writes nothing.
2. throughput: audio seconds per second and MFU at the recipe batch and at the largest batch that fits (doubling
   from the recipe batch, then bisection, on out-of-memory). FLOPs per second of audio are counted analytically
   (`forward_flops`): the CNN's convolutions, the feature projection, the positional convolution, per transformer
   layer the QKV and output projections, the attention scores and their weighted sum and the FFN (times 1 -
   layer_drop: the layers a training step runs), the final projection and the cosine logits over K; a training step
   is 3x the forward (recomputation under checkpointing is not counted: model FLOPs). MFU is against the GPU's
   dense bf16 datasheet peak (H100 SXM and H200 989 TFLOP/s, H100 PCIe 756, A100 312), named, and against the
   matmul rate measured in part 1.
3. memory: torch.cuda.max_memory_allocated of a steady training step (weights, gradients, AdamW moments,
   activations) at the recipe batch with no checkpointing, with checkpointed layers, and with layers + CNN, and the
   largest batch each fits. --memory-cap-gib counts a batch whose peak is above it as not fitting (a smaller GPU).
4. pipeline: audio seconds per second that one CPU core decodes from FLAC (a corpus of `fedhubert synth
   librispeech`), crops and batches (`batch_loader`, no worker processes), against what the GPU trains on at the
   recipe batch: the loader workers one GPU needs.
5. federated: `fedhubert partition`, `kmeans` (K = 100) and `pretrain` (2 rounds) of 4 base-preset clients sharing
   the GPU (federation.gpus_per_client=0.25), run as the command line runs them: a round's wall time against its
   clients' training time (clients training at once x round time / the clients' summed `train_time_s`, as
   benchmarks/scale.py counts the per-client overhead), the peak GPU memory in use (nvidia-smi, sampled) and the
   clients' own peaks.
6. kernels (last: torch.compile's time is the hardest to foresee, and this part gets what the others left): which
   attention kernels one profiled bf16 step reaches (fused flash / memory-efficient SDPA, or the math fallback),
   then throughput eager against torch.compile(model), after warming the compiled model until a step compiles no
   new graph; the compile time, graphs and graph breaks apart.

Targets: MFU >= 35% in bf16; checkpointing fits >= 2.5x the audio per batch that fits without it (1 / issue 5's
40% of the activations); a federated round's overhead under 15% of its compute; the loader keeps the GPU fed with
the 16 cores of a GPU node (its workers and the training process).

--smoke runs the same parts and code paths on CPU at tiny sizes (tiny preset, 1 s crops, 2 s batches, a corpus of
about 2 minutes), without verdicts and without installing anything: memory is then what autograd saves
(`measure_saved_bytes`) plus 16 bytes per parameter, with a cap of 4.5x the recipe batch's (a CPU has no
out-of-memory to find); MFU is against the measured matmul rate; torch.compile uses the aot_eager backend (the
same graph capture and graph breaks; inductor's cold compile alone takes over a minute on 2 CPU cores) and is timed
after 3 compiled steps (the GPU run warms up until a step compiles nothing new: 9 steps on CPU, where the label head's
boolean indexing recompiles until dynamo's recompile limit).

    python benchmarks/gpu.py                              # on the GPU machine: at most 8 minutes
    python benchmarks/gpu.py --smoke --out /tmp/gpu.json  # CPU, tiny sizes, the same code paths
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedhubert.model.config import ModelConfig
from fedhubert.model.frames import feature_frames

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
NAME = "gpu"
K = 100
SAMPLE_RATE = 16000
# The parts in the order they run: kernels last, so that torch.compile (the one step whose length is hard to
# foresee) gets whatever the others left.
PARTS = ("environment", "throughput", "memory", "pipeline", "federated", "kernels")
# Each part's share of the budget; the 450 s default leaves the 8-minute call room for starting the processes.
SHARES = {"environment": 0.04, "throughput": 0.16, "memory": 0.2, "pipeline": 0.06, "federated": 0.34, "kernels": 0.2}
BUDGET_S, SMOKE_BUDGET_S = 450.0, 240.0
GRACE_S = 15.0  # past its budget a part is stopped (its process group killed) after this
INSTALL_TIMEOUT_S = 300.0
INSTALL_ENV = "FEDHUBERT_GPU_BENCH_INSTALL"  # set for the run that follows an install: what the install did
SEARCH_PRECISION = 1 / 32  # the batch search stops once the largest that fits is known to within this share
SMOKE_CAP_FACTOR = 4.5  # smoke: a batch fits while its memory is within this many times the recipe batch's
NODE_CORES = 16  # the cores of a GPU node that the loader target counts with
# Dense bf16 peaks from the vendors' datasheets, by a part of the name that nvidia-smi and torch report.
DATASHEET_BF16_TFLOPS = (
    ("h200", "NVIDIA H200 (SXM)", 989.0),
    ("h100 pcie", "NVIDIA H100 PCIe", 756.0),
    ("h100", "NVIDIA H100 SXM", 989.0),
    ("a100", "NVIDIA A100", 312.0),
)
FUSED_SDPA = (  # the fused attention ops SDPA dispatches to (forward), on GPUs and CPUs
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_fused_attention_overrideable",
)
MATH_SDPA = ("aten::_scaled_dot_product_attention_math",)
ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|attn", re.IGNORECASE)
CHECKPOINTING = {  # memory part: (checkpoint_layers, checkpoint_cnn)
    "no checkpointing": (False, False),
    "checkpointed layers": (True, False),
    "checkpointed layers + CNN": (True, True),
}


@dataclass(frozen=True)
class Sizes:
    """What the run trains on and how long it measures: the GPU's real sizes, or the smoke run's tiny ones."""

    preset: str
    crop_seconds: float  # every crop's length (the recipe's data.max_seconds)
    batch_seconds: float  # audio per batch as configured (the recipe's data.batch_seconds)
    min_seconds: float  # the recipe's data.min_seconds (the pipeline's loader skips shorter utterances)
    warmup: int  # updates before a timing
    steps: int  # timed updates (fewer where the budget runs short)
    max_crops: int  # the batch search's upper bound
    matmul: int  # N of the timed N x N x N bf16 matmul
    pipeline_seconds: float  # how long the one-core loader is timed
    corpus: tuple[str, ...]  # `fedhubert synth librispeech` flags
    kmeans_workers: int  # featurising processes (0: one per core)
    local_steps: int  # a federated client's updates per round
    pretrain: tuple[str, ...]  # the federated part's `fedhubert pretrain` overrides
    compile_backend: str
    compile_warmup: int  # at most this many compiled steps before the timing (dynamo's recompile limit is 8)

    @property
    def crop_samples(self) -> int:
        return int(self.crop_seconds * SAMPLE_RATE)

    @property
    def recipe_crops(self) -> int:
        """Crops per batch as `CropBatches` sizes them for utterances at least a crop long."""
        return max(1, int(self.batch_seconds * SAMPLE_RATE) // self.crop_samples)


CORPUS_SUBSETS = ("subsets.train-clean-360=0", "subsets.train-other-500=0", "subsets.test-clean=0")
GPU = Sizes(
    preset="base",
    crop_seconds=15.625,
    batch_seconds=87.5,
    min_seconds=2.0,
    warmup=3,
    steps=10,
    max_crops=2048,
    matmul=8192,
    pipeline_seconds=10.0,
    corpus=("--speakers", "10", "--minutes", "1.5", "--seed", "0", *CORPUS_SUBSETS),
    kmeans_workers=0,
    local_steps=20,
    pretrain=("train.device=cuda", "federation.gpus_per_client=0.25"),
    compile_backend="inductor",
    compile_warmup=12,
)
SMOKE = Sizes(
    preset="tiny",
    crop_seconds=1.0,
    batch_seconds=2.0,
    min_seconds=1.0,
    warmup=1,
    steps=2,
    max_crops=16,
    matmul=256,
    pipeline_seconds=2.0,
    corpus=("--speakers", "8", "--minutes", "0.2", "--seed", "1", "chapters=1", "max_seconds=6", *CORPUS_SUBSETS),
    kmeans_workers=2,
    local_steps=2,
    pretrain=(
        "train.device=cpu",
        "federation.gpus_per_client=0",
        "train.data.min_seconds=1",
        "train.data.max_seconds=1",
        "train.data.batch_seconds=2",
        "valid_seconds=2",
    ),
    compile_backend="aot_eager",
    compile_warmup=3,
)


# ------------------------------------------------------------------------------------------------------ FLOPs
def cnn_flops(cfg: ModelConfig, samples: int) -> float:
    """The CNN's convolutions: 2 x out channels x in channels x kernel per output frame of each layer."""
    total, length, channels_in = 0.0, samples, 1
    for channels, kernel, stride in cfg.conv_layers:
        length = (length - kernel) // stride + 1
        total += 2.0 * channels * channels_in * kernel * max(length, 0)
        channels_in = channels
    return total


def transformer_layer_flops(frames: int, dim: int, ffn: int) -> float:
    """One transformer layer over `frames` frames: the Q, K, V and output projections, the attention scores
    Q K^T and their weighted sum of V (over all heads together: heads x head_dim = dim), and the two FFN matmuls."""
    projections = 4 * 2.0 * frames * dim * dim
    attention = 2 * 2.0 * frames * frames * dim
    feed_forward = 2 * 2.0 * frames * dim * ffn
    return projections + attention + feed_forward


def forward_flops(cfg: ModelConfig, samples: int, num_classes: int) -> dict[str, float]:
    """The matmul and convolution FLOPs of one training forward of one crop of `samples` samples, by component
    (norms, activations and the loss are left out). The transformer counts 1 - layer_drop of its layers: those a
    training step runs on average. The logits are the cosine similarities of every frame (masked and unmasked)
    with the K label embeddings."""
    frames = feature_frames(samples, cfg)
    dim = cfg.embed_dim
    return {
        "cnn": cnn_flops(cfg, samples),
        "feature_projection": 2.0 * frames * cfg.conv_layers[-1][0] * dim,
        "positional_convolution": 2.0 * frames * dim * (dim // cfg.pos_conv_groups) * cfg.pos_conv_kernel,
        "transformer": cfg.layers * (1 - cfg.layer_drop) * transformer_layer_flops(frames, dim, cfg.ffn_dim),
        "final_projection": 2.0 * frames * dim * cfg.final_dim,
        "logits": 2.0 * frames * num_classes * cfg.final_dim,
    }


def training_flops_per_audio_second(cfg: ModelConfig, samples: int, num_classes: int) -> float:
    """A training step's FLOPs (forward and backward, 3x the forward) per second of audio in crops of `samples`."""
    return 3 * sum(forward_flops(cfg, samples, num_classes).values()) / (samples / SAMPLE_RATE)


def datasheet_peak(gpu_name: str) -> tuple[str, float] | None:
    """(the GPU as the table names it, its dense bf16 TFLOP/s), or None for a GPU not in the table."""
    name = gpu_name.lower()
    if "nvl" in name:  # an H100 NVL is neither of the H100s of the table
        return None
    for key, label, tflops in DATASHEET_BF16_TFLOPS:
        if key in name:
            return label, tflops
    return None


# ------------------------------------------------------------------------------------------------- the records
@dataclass
class Budget:
    deadline: float  # time.time() by which the part should be done

    def left(self) -> float:
        return self.deadline - time.time()

    def expired(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve


class PartRecord:
    """A part's figures and details, rewritten to <work>/<part>.json after every change, so that what a part
    measured survives it being stopped at its time limit."""

    def __init__(self, path: Path, part: str, smoke: bool):
        self.path, self.smoke = path, smoke
        self.data: dict = {"part": part, "figures": [], "details": {}, "stage": "starting", "stopped": None}

    def figure(self, figure: str, ours: float, unit: str, target: str | None = None, met: bool | None = None) -> None:
        if not math.isfinite(ours):
            raise ValueError(f"figure {figure!r} is not a finite number: {ours}")
        row: dict = {"figure": figure, "ours": float(f"{ours:.4g}"), "unit": unit, "part": self.data["part"]}
        if target is not None:
            row.update(target=target, met=None if self.smoke else bool(met))
        self.data["figures"].append(row)
        self.save()

    def detail(self, key: str, value) -> None:
        self.data["details"][key] = value
        self.save()

    def stage(self, text: str) -> None:
        self.data["stage"] = text
        self.save()
        print(f"[{self.data['part']}] {text}", flush=True)

    def stop(self, why: str) -> None:
        """The part ends early (its budget): what it measured so far stands."""
        self.data["stopped"] = why
        self.stage(f"stopped: {why}")

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


@dataclass
class Context:
    part: str
    smoke: bool
    sizes: Sizes
    work: Path
    budget: Budget
    memory_cap_bytes: int | None  # --memory-cap-gib

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    def earlier(self, part: str) -> dict:
        """An earlier part's record ({} if it wrote none)."""
        path = self.work / f"{part}.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def audio_label(crops: int, sizes: Sizes) -> str:
    return f"{crops} x {sizes.crop_seconds:g} s = {crops * sizes.crop_seconds:g} s"


# ------------------------------------------------------------------------------------------------ the trainer
@dataclass
class Probe:
    """One training step at a batch of `crops` crops: whether it fit, its peak memory and its time."""

    crops: int
    fits: bool
    peak_bytes: int | None
    seconds: float | None
    why: str = ""
    reserved_bytes: int | None = None  # GPU: what the caching allocator held at most (what out-of-memory counts)


class Trainer:
    """A HuBERT, its AdamW and the repository's training loop (`train`) on synthetic batches of the run's crops
    (random waveforms and labels: the compute does not depend on the content)."""

    def __init__(self, ctx: Context, layers: bool = False, cnn: bool = False):
        import torch

        from fedhubert.config import load_config
        from fedhubert.model.hubert import build_hubert, enable_checkpointing
        from fedhubert.train.config import LossConfig, TrainConfig
        from fedhubert.train.loop import MaskedPrediction, make_optimizer

        self.torch, self.sizes = torch, ctx.sizes
        self.device = torch.device(ctx.device)
        self.cfg = load_config(ModelConfig, None, [f"preset={ctx.sizes.preset}"])
        self.tcfg = load_config(
            TrainConfig,
            None,
            [
                f"device={ctx.device}",
                "precision=bf16",
                f"checkpoint_layers={str(layers).lower()}",
                f"checkpoint_cnn={str(cnn).lower()}",
                "optim.lr=5e-4",
                "optim.warmup_steps=1",
                "optim.total_steps=1000000",
            ],
        )
        torch.manual_seed(0)
        self.model = build_hubert(self.cfg, K).to(self.device)
        enable_checkpointing(self.model, layers, cnn)
        self.optimizer = make_optimizer(self.model, self.tcfg.optim)
        self.runner: torch.nn.Module = self.model  # what `train` calls: the model, or torch.compile of it
        self.objective = MaskedPrediction(LossConfig())
        self.global_step = 0
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self._batches: dict[int, object] = {}

    def batch(self, crops: int):
        """A batch of `crops` crops, CPU tensors as a DataLoader hands them over: one random crop and its labels,
        repeated (cheap to make at thousands of crops; the compute does not depend on the content)."""
        if crops not in self._batches:
            from fedhubert.train.data import Batch

            self._batches.clear()
            generator = self.torch.Generator().manual_seed(0)
            frames = feature_frames(self.sizes.crop_samples, self.cfg)
            wave = self.torch.randn(1, self.sizes.crop_samples, generator=generator) * 0.1
            labels = self.torch.randint(0, K, (1, frames), generator=generator)
            self._batches[crops] = Batch(wave.expand(crops, -1).contiguous(), labels.expand(crops, -1).contiguous())
        return self._batches[crops]

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def run(self, crops: int, steps: int) -> float:
        """`steps` updates of `train` at batches of `crops` crops; their wall time in seconds."""
        from fedhubert.train.loop import train

        batch = self.batch(crops)
        self.sync()
        start = time.perf_counter()
        result = train(
            self.runner,
            itertools.repeat(batch),
            self.tcfg,
            objective=self.objective,
            steps=steps,
            global_step=self.global_step,
            optimizer=self.optimizer,
            device=self.device,
        )
        self.sync()
        self.global_step = result.global_step
        return time.perf_counter() - start

    def probe(self, crops: int, cap_bytes: int | None) -> Probe:
        """One update at `crops` crops: its peak memory (on a GPU the allocator's peak, which out-of-memory ends;
        on CPU what autograd saves plus 16 bytes per parameter for weights, gradients and AdamW's moments) and
        whether it fits (no out-of-memory, and within `cap_bytes` when given)."""
        torch = self.torch
        oom = ""
        peak = seconds = reserved = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                seconds = self.run(crops, 1)
                peak = int(torch.cuda.max_memory_allocated(self.device))
                reserved = int(torch.cuda.max_memory_reserved(self.device))
            except torch.cuda.OutOfMemoryError:
                oom = "out of memory"
            except RuntimeError as err:  # cuBLAS and cuDNN report a failed allocation their own way
                if "ALLOC_FAILED" not in str(err) and "out of memory" not in str(err):
                    raise
                oom = f"out of memory ({str(err).splitlines()[0][:120]})"
            if oom:
                self.optimizer.zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache()
                return Probe(crops, False, None, None, oom)
        else:
            from fedhubert.train.memory import measure_saved_bytes

            with measure_saved_bytes() as saved:
                seconds = self.run(crops, 1)
            peak = saved["bytes"] + 16 * self.parameters
        if cap_bytes is not None and peak > cap_bytes:
            return Probe(crops, False, peak, seconds, f"over the cap of {cap_bytes / 2**30:.3f} GiB", reserved)
        return Probe(crops, True, peak, seconds, "", reserved)

    def throughput(self, crops: int, budget: Budget, warmup: int | None = None) -> tuple[float, int]:
        """Audio seconds per second over up to `sizes.steps` timed updates after `warmup` (fewer timed updates
        where the budget would not hold them); and how many were timed."""
        warm = self.sizes.warmup if warmup is None else warmup
        per_step = self.run(crops, warm) / warm if warm else None
        steps = self.sizes.steps
        if per_step:
            steps = max(1, min(steps, int(0.8 * budget.left() / per_step)))
        seconds = self.run(crops, steps)
        return steps * crops * self.sizes.crop_seconds / seconds, steps

    def release(self) -> None:
        """Free this trainer's GPU memory for the next one."""
        self._batches.clear()
        del self.runner, self.model, self.optimizer
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()


def largest_batch(
    probe: Callable[[int], Probe], start: int, limit: int, budget: Budget, reserve: float
) -> tuple[Probe | None, list[Probe], str]:
    """The largest batch (in crops) that fits: doubling from `start` until one does not fit, then bisection
    between the largest that fit and the smallest that did not, to within SEARCH_PRECISION of it. Returns it (None
    if not even one crop fits), every probe, and how the search ended: 'found', 'limit' (`limit` crops fit: the
    answer is at least that) or 'budget' (stopped with `reserve` seconds left: the answer is at least the one
    returned)."""
    probes: list[Probe] = []
    best: Probe | None = None
    crops = min(start, limit)
    while True:
        if budget.expired(reserve):
            return best, probes, "budget"
        result = probe(crops)
        probes.append(result)
        if not result.fits:
            first_fail = crops
            break
        best = result
        if crops >= limit:
            return best, probes, "limit"
        crops = min(2 * crops, limit)
    low = best.crops if best else 0
    while first_fail - low > max(1, int(low * SEARCH_PRECISION)):
        if budget.expired(reserve):
            return best, probes, "budget"
        result = probe((low + first_fail) // 2)
        probes.append(result)
        if result.fits:
            best, low = result, result.crops
        else:
            first_fail = result.crops
    return best, probes, "found"


def search_note(how: str, sizes: Sizes) -> str:
    return {
        "found": "",
        "limit": f" (at least: the search stops at {sizes.max_crops} crops)",
        "budget": " (at least: the search ran out of its budget)",
    }[how]


# ------------------------------------------------------------------------------------------------------ parts
def part_environment(rec: PartRecord, ctx: Context) -> None:
    """Versions, the GPU, whether CUDA can be used, and a timed bf16 matmul."""
    env: dict = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "pins": read_pins(),
        "missing_modules": [
            m for m in ("soundfile", "soxr", "flwr", "ray", "psutil", "sklearn", "yaml") if not module_exists(m)
        ],
        **nvidia_smi(),
    }
    rec.detail("environment", env)
    import torch

    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        import torchaudio

        env["torchaudio"] = torchaudio.__version__
    except Exception as err:  # a torchaudio built for another torch fails in many ways; say which
        env["torchaudio_error"] = f"{type(err).__name__}: {err}"
    env["matches_pins"] = all((env.get(name) or "").split("+")[0] == version for name, version in env["pins"].items())
    if ctx.smoke:
        env.update(device="cpu smoke", cuda_usable=False)
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            device="cuda",
            gpu_name=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_bytes=int(props.total_memory),
            multiprocessors=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        try:
            ones = torch.ones(64, 64, device="cuda", dtype=torch.bfloat16)
            check = ones @ ones
            env["cuda_usable"] = bool(float(check[0, 0]) == 64.0) and env["bf16_supported"]
        except Exception as err:
            env.update(cuda_usable=False, cuda_error=f"{type(err).__name__}: {err}")
    else:
        env.update(device="none", cuda_usable=False)
    rec.detail("environment", env)
    if not ctx.smoke and not env["cuda_usable"]:
        return
    n = ctx.sizes.matmul
    device = torch.device("cpu" if ctx.smoke else "cuda")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds, repeats = timed(lambda: a @ b, device, 10)
    rate = 2.0 * n**3 * repeats / seconds / 1e12
    rec.figure(f"bf16 matmul rate ({n}^3, measured)", rate, "TFLOP/s")
    peak = None if ctx.smoke else datasheet_peak(env["gpu_name"])
    rec.detail(
        "peak",
        {"name": peak[0], "tflops": peak[1], "source": "datasheet"}
        if peak
        else {"name": f"the measured bf16 matmul rate of {env.get('gpu_name', 'this CPU')}", "tflops": rate},
    )
    rec.detail("matmul_tflops", rate)
    if not ctx.smoke:
        rec.figure(f"GPU memory ({env['gpu_name']})", env["gpu_memory_bytes"] / 2**30, "GiB")


def timed(run: Callable[[], object], device, repeats: int) -> tuple[float, int]:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, repeats


def peak_of(ctx: Context) -> dict:
    """The peak MFU is measured against (from the environment part), and the measured matmul rate."""
    details = ctx.earlier("environment").get("details", {})
    if "peak" not in details:
        raise RuntimeError("the environment part measured no peak: it did not complete (see its log)")
    return {**details["peak"], "matmul_tflops": details["matmul_tflops"]}


def mfu_figures(rec: PartRecord, ctx: Context, label: str, rate: float, flops: float) -> None:
    peak = peak_of(ctx)
    achieved = rate * flops / 1e12
    mfu = achieved / peak["tflops"]
    rec.figure(f"{label}: model TFLOP/s", achieved, "TFLOP/s")
    rec.figure(f"{label}: MFU vs {peak['name']} ({peak['tflops']:.4g} TFLOP/s)", 100 * mfu, "%", ">= 35%", mfu >= 0.35)
    if peak.get("source") == "datasheet":
        rec.figure(f"{label}: MFU vs the measured bf16 matmul rate", 100 * achieved / peak["matmul_tflops"], "%")


def part_throughput(rec: PartRecord, ctx: Context) -> None:
    """Throughput and MFU at the recipe batch, then the largest batch without checkpointing and its throughput."""
    sizes, budget = ctx.sizes, ctx.budget
    trainer = Trainer(ctx)
    flops = training_flops_per_audio_second(trainer.cfg, sizes.crop_samples, K)
    rec.detail(
        "flops",
        {
            "crop_samples": sizes.crop_samples,
            "frames": feature_frames(sizes.crop_samples, trainer.cfg),
            "forward_per_crop": forward_flops(trainer.cfg, sizes.crop_samples, K),
            "training_per_audio_second": flops,
            "parameters": trainer.parameters,
        },
    )
    rec.figure("training FLOPs per second of audio (analytic)", flops / 1e9, "GFLOP")
    recipe = sizes.recipe_crops
    rec.stage(f"recipe batch: {audio_label(recipe, sizes)}")
    first = trainer.probe(recipe, ctx.memory_cap_bytes)
    rec.detail("recipe_probe", asdict(first))
    if not first.fits:
        raise RuntimeError(f"the recipe batch ({audio_label(recipe, sizes)}) does not fit: {first.why}")
    rate, steps = trainer.throughput(recipe, budget)
    label = f"recipe batch ({audio_label(recipe, sizes)})"
    rec.figure(f"throughput, {label}", rate, "audio s/s")
    rec.detail("recipe", {"crops": recipe, "audio_per_second": rate, "timed_steps": steps})
    mfu_figures(rec, ctx, label, rate, flops)
    cap = ctx.memory_cap_bytes
    if ctx.smoke:
        cap = int(SMOKE_CAP_FACTOR * first.peak_bytes)
    rec.detail("memory_cap_bytes", cap)
    rec.stage("largest batch without checkpointing")
    reserve = 0.25 * max(budget.left(), 0.0)
    best, probes, how = largest_batch(lambda n: trainer.probe(n, cap), recipe, sizes.max_crops, budget, reserve=reserve)
    rec.detail("search", {"how": how, "probes": [asdict(p) for p in probes]})
    if best is None:
        raise RuntimeError("the batch search found no batch that fits")
    rec.detail("largest", {"crops": best.crops, "how": how, "peak_bytes": best.peak_bytes})
    rec.figure(
        f"largest batch, no checkpointing{search_note(how, sizes)}", best.crops * sizes.crop_seconds, "s of audio"
    )
    if budget.expired():
        rec.stop("no time left to time the largest batch")
        return
    rate, steps = trainer.throughput(best.crops, budget, warmup=1)
    label = f"largest batch ({audio_label(best.crops, sizes)})"
    rec.figure(f"throughput, {label}", rate, "audio s/s")
    mfu_figures(rec, ctx, label, rate, flops)


def part_memory(rec: PartRecord, ctx: Context) -> None:
    """Peak memory at the recipe batch and the largest batch for each checkpointing setting."""
    sizes = ctx.sizes
    earlier = ctx.earlier("throughput").get("details", {})
    cap = earlier.get("memory_cap_bytes", ctx.memory_cap_bytes)
    if ctx.smoke and cap is None:
        raise RuntimeError("the smoke run's memory cap comes from the throughput part, which did not record it")
    largest: dict[str, float] = {}
    hows: dict[str, str] = {}
    for index, (name, (layers, cnn)) in enumerate(CHECKPOINTING.items()):
        share = Budget(time.time() + ctx.budget.left() / (len(CHECKPOINTING) - index))
        rec.stage(f"{name}: recipe batch")
        trainer = Trainer(ctx, layers, cnn)
        trainer.probe(sizes.recipe_crops, cap)  # the first update allocates AdamW's moments after its backward
        recipe = trainer.probe(sizes.recipe_crops, cap)  # the second holds them throughout: the steady peak
        if recipe.peak_bytes is None:
            raise RuntimeError(f"{name}: the recipe batch does not fit: {recipe.why}")
        rec.figure(f"{name}: peak memory, recipe batch", recipe.peak_bytes / 2**30, "GiB")
        reused = earlier.get("largest") if name == "no checkpointing" else None
        if reused:
            best_crops, how = reused["crops"], reused["how"]
            peak_bytes = reused["peak_bytes"]
        else:
            rec.stage(f"{name}: largest batch")
            # Checkpointing fits at least what no checkpointing fits: the search starts there.
            start = int(largest.get("no checkpointing", 0) / sizes.crop_seconds) or sizes.recipe_crops
            best, probes, how = largest_batch(
                lambda n, t=trainer: t.probe(n, cap), start, sizes.max_crops, share, reserve=0.0
            )
            rec.detail(f"search: {name}", {"how": how, "probes": [asdict(p) for p in probes]})
            if best is None:
                raise RuntimeError(f"{name}: no batch fits")
            best_crops, peak_bytes = best.crops, best.peak_bytes
        largest[name], hows[name] = best_crops * sizes.crop_seconds, how
        rec.figure(f"{name}: largest batch{search_note(how, sizes)}", largest[name], "s of audio")
        rec.figure(f"{name}: peak memory, largest batch", peak_bytes / 2**30, "GiB")
        trainer.release()
        if ctx.budget.expired():
            rec.stop(f"out of budget after {name}")
            break
    for name in list(CHECKPOINTING)[1:]:
        if name in largest and "no checkpointing" in largest:
            ratio = largest[name] / largest["no checkpointing"]
            bound = "" if {hows[name], hows["no checkpointing"]} == {"found"} else " (searches cut short: a bound)"
            rec.figure(f"{name}: largest batch / no checkpointing{bound}", ratio, "x", ">= 2.5", ratio >= 2.5)


def attention_ops(prof) -> dict:
    """The SDPA ops and attention kernels one profiled step ran: fused forward calls, math-fallback calls, and the
    device kernels whose names say attention."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    ops = {
        e.key: e.count for e in events if e.key.startswith(("aten::_scaled_dot_product", "aten::_flash", "aten::_eff"))
    }
    kernels = sorted(
        {
            e.key[:160]
            for e in events
            if getattr(e, "device_type", None) == DeviceType.CUDA and ATTENTION_KERNEL.search(e.key)
        }
    )
    return {
        "sdpa_ops": ops,
        "fused_forward_calls": sum(ops.get(name, 0) for name in FUSED_SDPA),
        "math_forward_calls": sum(ops.get(name, 0) for name in MATH_SDPA),
        "attention_kernels": kernels[:40],
    }


def part_kernels(rec: PartRecord, ctx: Context) -> None:
    """One profiled step's attention ops and kernels, then eager against torch.compile(model)."""
    import torch

    sizes, budget = ctx.sizes, ctx.budget
    trainer = Trainer(ctx)
    recipe = sizes.recipe_crops
    rec.stage("profiling one bf16 step")
    trainer.run(recipe, 1)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        trainer.run(recipe, 1)
    found = attention_ops(prof)
    rec.detail("attention", found)
    calls = found["fused_forward_calls"] + found["math_forward_calls"]
    rec.figure("attention: forward calls on fused SDPA kernels (one step)", found["fused_forward_calls"], "calls")
    rec.figure("attention: forward calls on the math fallback (one step)", found["math_forward_calls"], "calls")
    if calls:
        rec.figure("attention: share on fused kernels", found["fused_forward_calls"] / calls, "x")
    rec.stage("eager throughput")
    eager, _ = trainer.throughput(recipe, Budget(time.time() + 0.2 * budget.left()))
    label = f"recipe batch ({audio_label(recipe, sizes)})"
    rec.figure(f"eager throughput, {label}", eager, "audio s/s")
    step_s = recipe * sizes.crop_seconds / eager
    rec.stage(f"torch.compile (backend {sizes.compile_backend})")
    trainer.runner = torch.compile(trainer.model, backend=sizes.compile_backend)
    warm = compile_warmup(trainer, recipe, budget)
    rec.detail("compile", {"backend": sizes.compile_backend, **warm})
    backend = f"torch.compile ({sizes.compile_backend})"
    rec.figure(
        f"{backend}: compile time (the warm-up steps less as many eager)",
        max(warm["seconds"] - warm["steps"] * step_s, 0.0),
        "s",
    )
    rec.figure(f"{backend}: warm-up steps{'' if warm['settled'] else ' (still compiling)'}", warm["steps"], "steps")
    rec.figure(f"{backend}: graphs compiled", warm["graphs"], "graphs")
    rec.figure(f"{backend}: graph breaks", warm["graph_breaks"], "breaks")
    if budget.expired():
        rec.stop("no time left to time the compiled model")
        return
    compiled, steps = trainer.throughput(recipe, budget, warmup=1)
    rec.figure(f"{backend} throughput, {label}", compiled, "audio s/s")
    rec.figure(f"{backend} / eager throughput", compiled / eager, "x")
    rec.detail("compile", {"backend": sizes.compile_backend, **warm, "timed_steps": steps})


def compile_warmup(trainer: Trainer, crops: int, budget: Budget) -> dict:
    """Steps of the compiled model until one compiles no new graph, at most `sizes.compile_warmup`: their time, how
    many, whether the last compiled nothing new, and dynamo's counts of graphs and graph breaks. (On torch 2.8 the
    frames resumed after the label head's boolean indexing recompile every step, their guards holding a tensor that
    is freed, until dynamo's recompile limit of 8 leaves them to eager: 9 steps.)"""
    from torch._dynamo.utils import counters

    seconds, steps, settled = 0.0, 0, False
    while steps < trainer.sizes.compile_warmup and not budget.expired():
        graphs = counters["stats"]["unique_graphs"]
        seconds += trainer.run(crops, 1)
        steps += 1
        if steps > 1 and counters["stats"]["unique_graphs"] == graphs:
            settled = True
            break
    reasons = counters["graph_break"]
    return {
        "seconds": seconds,
        "steps": steps,
        "settled": settled,
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(reasons.values()),
        "graph_break_reasons": {reason[:200]: count for reason, count in reasons.most_common(10)},
    }


def part_pipeline(rec: PartRecord, ctx: Context) -> None:
    """One core's decoding, cropping and batching rate from FLAC, against the GPU's consumption."""
    import numpy as np
    import torch

    from fedhubert.audio import audio_info
    from fedhubert.config import load_config
    from fedhubert.train.config import TrainConfig
    from fedhubert.train.data import LabelRate, Utterance, batch_loader
    from fedhubert.train.loop import cycle_batches

    corpus = make_corpus(rec, ctx)
    sizes = ctx.sizes
    cfg = load_config(ModelConfig, None, [f"preset={sizes.preset}"])
    rate = LabelRate(100, cfg)
    data = load_config(
        TrainConfig,
        None,
        [
            f"data.min_seconds={sizes.min_seconds}",
            f"data.max_seconds={sizes.crop_seconds}",
            f"data.batch_seconds={sizes.batch_seconds}",
            "data.num_workers=0",
        ],
    ).data
    rng = np.random.default_rng(0)
    utterances = []
    for path in sorted(corpus.glob("train-*/*/*/*.flac")):
        samples = audio_info(path).num_samples
        labels = rng.integers(0, K, rate.frames(samples)).astype(np.int16)  # the .km labels' alignment, random ids
        if samples >= int(sizes.min_seconds * SAMPLE_RATE):
            utterances.append(Utterance(path, samples, labels))
    if not utterances:
        raise RuntimeError(f"no training utterance of at least {sizes.min_seconds} s in {corpus}")
    core = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    rec.stage(f"one core (cpu {core}) decoding {len(utterances)} utterances")
    loader = batch_loader(utterances, rate, data, seed=0)
    audio = 0.0
    batches = 0
    limit = min(sizes.pipeline_seconds, max(ctx.budget.left() - 5, 1.0))
    start = time.perf_counter()
    for batch in cycle_batches(loader):
        audio += batch.seconds
        batches += 1
        if time.perf_counter() - start >= limit:
            break
    if not batches:
        raise RuntimeError(f"the loader made no batch of the {len(utterances)} utterances")
    per_core = audio / (time.perf_counter() - start)
    rec.detail("loader", {"utterances": len(utterances), "batches": batches, "audio_s": audio, "core": core})
    rec.figure("loader: one core decodes, crops and batches", per_core, "audio s/s")
    consumed = ctx.earlier("throughput").get("details", {}).get("recipe", {}).get("audio_per_second")
    if consumed is None:
        rec.stop("no training throughput to compare with: the throughput part did not measure the recipe batch")
        return
    workers = math.ceil(consumed / per_core)
    rec.figure("loader: training consumes (recipe batch)", consumed, "audio s/s")
    rec.figure(
        f"loader workers one GPU needs (+1 core for training, of {NODE_CORES})",
        workers,
        "workers",
        f"<= {NODE_CORES - 1}",
        workers + 1 <= NODE_CORES,
    )


def part_federated(rec: PartRecord, ctx: Context) -> None:
    """partition, kmeans and a 2-round pretrain of 4 clients through the command line; the rounds' timing and
    memory from the run's metrics.jsonl and a sampler."""
    sizes = ctx.sizes
    corpus = make_corpus(rec, ctx)
    partition, kmeans, run = ctx.work / "partition", ctx.work / "kmeans", ctx.work / "pretrain"
    stages = {}
    stages["partition"] = fedhubert_cli(
        rec,
        ctx,
        "partition",
        [
            "--corpus",
            corpus,
            "--out",
            partition,
            "--clients",
            "4",
            "use_cache=false",
            "train_subsets=[train-clean-100]",
        ],
    )
    stages["kmeans"] = fedhubert_cli(
        rec,
        ctx,
        "kmeans",
        [
            "--partition",
            partition,
            "--out",
            kmeans,
            "--clusters",
            K,
            "--workers",
            sizes.kmeans_workers,
            "sample_fraction=1.0",
            "minibatch.n_init=1",
            "minibatch.max_iter=20",
            "lloyd.max_rounds=3",
            "reference=false",
        ],
    )
    sampler = MemorySampler(smoke=ctx.smoke)
    sampler.start()
    try:
        stages["pretrain"] = fedhubert_cli(
            rec,
            ctx,
            "pretrain",
            [
                "--partition",
                partition,
                "--kmeans",
                kmeans,
                "--out",
                run,
                "--preset",
                sizes.preset,
                "--rounds",
                "2",
                "--local-steps",
                sizes.local_steps,
                "train.precision=bf16",
                *sizes.pretrain,
            ],
            check=False,
        )
    finally:
        sampler.stop()
    rec.detail("stages_s", stages)
    rec.detail("memory_samples", {"count": sampler.count, "what": sampler.what, "baseline_bytes": sampler.baseline})
    from _common import read_jsonl  # benchmarks/ is on the path when run as a script, not when loaded by a test

    rows = read_jsonl(run / "metrics.jsonl")
    rounds = {r["round"]: r for r in rows if r.get("kind") == "train"}
    clients = [r for r in rows if r.get("kind") == "client"]
    console = (ctx.work / "pretrain.log").read_text(errors="replace")
    at_once = re.findall(r"(\d+) training at once", console)
    workers = int(at_once[-1]) if at_once else None
    rec.detail("rounds", {"rows": list(rounds.values()), "clients_at_once": workers})
    if not rounds:
        raise RuntimeError(f"pretrain wrote no round (see {ctx.work / 'pretrain.log'})")
    if sampler.peak is not None:
        rec.figure(f"federated: peak {sampler.what}", sampler.peak / 2**30, "GiB")
    peaks = [r["train_peak_memory_mb"] for r in clients if "train_peak_memory_mb" in r]
    if peaks:
        what = "max_memory_allocated" if not ctx.smoke else "peak RSS"
        rec.figure(f"federated: the largest client's peak ({what})", max(peaks) / 1024, "GiB")
    if workers is None:
        raise RuntimeError("the pretrain log does not say how many clients train at once")
    rec.figure("federated: clients training at once", workers, "clients")
    single = ctx.earlier("throughput").get("details", {}).get("recipe", {}).get("audio_per_second")
    for number, row in sorted(rounds.items()):
        mine = [c for c in clients if c.get("round") == number]
        trained = sum(float(c["train_time_s"]) for c in mine)
        label = f"federated round {number}" + (" (starts the actors, builds the models)" if number == 1 else "")
        rec.figure(f"{label}: wall time", float(row["seconds"]), "s")
        rec.figure(f"{label}: clients' training time, summed", trained, "s")
        if number == 1 or not trained:
            continue
        overhead = workers * float(row["seconds"]) / trained - 1
        rec.figure(f"{label}: overhead over its compute", 100 * overhead, "%", "< 15%", overhead < 0.15)
        audio = sum(float(c.get("train_audio_seconds", 0)) for c in mine)
        rec.figure(f"{label}: audio trained per second of the round", audio / float(row["seconds"]), "audio s/s")
        if single:
            rec.figure(f"{label}: that / one process at the recipe batch", audio / float(row["seconds"]) / single, "x")
    if stages["pretrain"]["returncode"] != 0:
        rec.stop(f"pretrain ended with exit code {stages['pretrain']['returncode']} (see its log)")


PART_FUNCTIONS = {
    "environment": part_environment,
    "throughput": part_throughput,
    "memory": part_memory,
    "kernels": part_kernels,
    "pipeline": part_pipeline,
    "federated": part_federated,
}


# -------------------------------------------------------------------------------------- the command line, data
def read_pins() -> dict[str, str]:
    """torch and torchaudio as requirements/requirements.in pins them."""
    pins = {}
    for line in (ROOT / "requirements" / "requirements.in").read_text().splitlines():
        match = re.fullmatch(r"(torch|torchaudio)==([\w.]+)", line.strip())
        if match:
            pins[match[1]] = match[2]
    return pins


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def nvidia_smi() -> dict:
    """The GPUs nvidia-smi lists, with the driver version ({} without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return {"nvidia_smi": None}
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"nvidia_smi": f"failed: {err}"}
    gpus = [line.split(", ") for line in out.stdout.strip().splitlines() if line.strip()]
    return {
        "nvidia_smi": out.stdout.strip() or out.stderr.strip(),
        "gpus": [g[0] for g in gpus],
        "driver": gpus[0][1] if gpus and len(gpus[0]) > 1 else None,
    }


def child_env() -> dict[str, str]:
    return {**os.environ, "FEDHUBERT_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}


def run_group(command: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run `command` in a process group of its own, its output into `log`; past `timeout` seconds the whole group
    is stopped (SIGTERM, then SIGKILL) and the exit code is None. Returns it and the wall time."""
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT, start_new_session=True
        )
        try:
            code: int | None = process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            code = None
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
    return code, time.perf_counter() - start


def fedhubert_cli(rec: PartRecord, ctx: Context, command: str, args: list, check: bool = True) -> dict:
    """`fedhubert COMMAND ARGS` in a process of its own, within the part's budget; its log in <work>/COMMAND.log."""
    rec.stage(f"fedhubert {command}")
    log = ctx.work / f"{command}.log"
    code, seconds = run_group([sys.executable, "-m", "fedhubert", command, *map(str, args)], log, ctx.budget.left() - 5)
    result = {"returncode": code, "seconds": round(seconds, 2)}
    if code is None:
        result["returncode"] = "stopped at the part's budget"
    if check and code != 0:
        raise RuntimeError(f"fedhubert {command}: {result['returncode']} (log: {log})\n{tail(log, 20)}")
    return result


def make_corpus(rec: PartRecord, ctx: Context) -> Path:
    """The synthetic LibriSpeech corpus the pipeline and federated parts read (made once per run)."""
    corpus = ctx.work / "LibriSpeech"
    if not (corpus / "SPEAKERS.TXT").is_file():
        workers = ["--workers", "2"] if ctx.smoke else []
        rec.detail(
            "corpus", fedhubert_cli(rec, ctx, "synth", ["librispeech", "--out", corpus, *workers, *ctx.sizes.corpus])
        )
    return corpus


def tail(path: Path, lines: int) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class MemorySampler(threading.Thread):
    """Every 0.5 s: the GPU memory in use, device-wide (nvidia-smi), above what was in use at the start; in a
    smoke run the summed RSS of this process's descendants instead (the federated run's processes)."""

    def __init__(self, smoke: bool):
        super().__init__(daemon=True)
        self.smoke = smoke
        self.what = "RSS of the run's processes (CPU smoke)" if smoke else "GPU memory in use (nvidia-smi, device-wide)"
        self.peak: int | None = None
        self.count = 0
        self._done = threading.Event()
        self.baseline = 0 if smoke else (self._gpu_used() or 0)

    def _gpu_used(self) -> int | None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            return int(out.stdout.strip().splitlines()[0]) * 2**20
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def _rss(self) -> int:
        import psutil

        total = 0
        for proc in psutil.Process().children(recursive=True):
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total

    def run(self) -> None:
        while not self._done.wait(0.5):
            used = self._rss() if self.smoke else self._gpu_used()
            if used is None:
                continue
            used -= self.baseline
            self.count += 1
            self.peak = used if self.peak is None else max(self.peak, used)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=15)


# --------------------------------------------------------------------------------------------- orchestration
@dataclass
class PartStatus:
    status: str  # ok, stopped (its budget), failed, skipped
    seconds: float
    budget_s: float
    why: str = ""
    log_tail: str = ""
    figures: list = field(default_factory=list)
    details: dict = field(default_factory=dict)


def child_main(args: argparse.Namespace) -> int:
    """One part, in this process: its record in <work>/<part>.json."""
    sizes = SMOKE if args.smoke else GPU
    cap = int(args.memory_cap_gib * 2**30) if args.memory_cap_gib else None
    ctx = Context(args.child, args.smoke, sizes, Path(args.work), Budget(args.deadline), cap)
    rec = PartRecord(ctx.work / f"{args.child}.json", args.child, args.smoke)
    rec.save()
    PART_FUNCTIONS[args.child](rec, ctx)
    if rec.data["stopped"] is None:
        rec.stage("done")
    return 0


def run_part(part: str, args: argparse.Namespace, work: Path, budget_s: float) -> PartStatus:
    """Start the part in a process of its own with `budget_s` seconds (stopped GRACE_S later if it overruns) and
    read back its record, however it ended."""
    command = [
        sys.executable,
        str(HERE),
        "--child",
        part,
        "--work",
        str(work),
        "--deadline",
        str(time.time() + budget_s),
    ]
    if args.smoke:
        command.append("--smoke")
    if args.memory_cap_gib:
        command += ["--memory-cap-gib", str(args.memory_cap_gib)]
    log = work / f"part-{part}.log"
    print(f"== {part}: budget {budget_s:.0f} s", flush=True)
    code, seconds = run_group(command, log, budget_s + GRACE_S)
    path = work / f"{part}.json"
    record = json.loads(path.read_text()) if path.is_file() else {"figures": [], "details": {}, "stage": "not started"}
    status = PartStatus(
        "ok", round(seconds, 1), round(budget_s, 1), figures=record["figures"], details=record["details"]
    )
    if code is None:
        status.status, status.why = (
            "stopped",
            f"out of budget: stopped at {budget_s + GRACE_S:.0f} s in: {record['stage']}",
        )
    elif code != 0:
        status.status, status.why = "failed", f"exit code {code} in: {record['stage']}"
    elif record.get("stopped"):
        status.status, status.why = "stopped", record["stopped"]
    if status.status != "ok":
        status.log_tail = tail(log, 40)
    print(f"   {part}: {status.status} in {seconds:.1f} s, {len(status.figures)} figures {status.why}", flush=True)
    if status.status == "failed":
        print(status.log_tail, flush=True)
    return status


def install_pinned(wheels: Path | None) -> dict:
    """pip install of the pinned torch and torchaudio into a fresh folder (from `wheels` when given)."""
    pins = read_pins()
    target = Path(tempfile.mkdtemp(prefix="fedhubert-torch-"))
    command = [sys.executable, "-m", "pip", "install", "--target", str(target), "--disable-pip-version-check"]
    command += [f"{name}=={version}" for name, version in pins.items()]
    if wheels is not None:
        command += ["--no-index", "--find-links", str(wheels)]
    print(f"== installing {pins} into {target}", flush=True)
    start = time.perf_counter()
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        code, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as err:
        code, text = None, f"pip did not finish in {INSTALL_TIMEOUT_S:.0f} s: {err}"
    return {
        "command": command,
        "target": str(target),
        "returncode": code,
        "ok": code == 0,
        "seconds": round(time.perf_counter() - start, 1),
        "output_tail": "\n".join(text.splitlines()[-15:]),
    }


def reexec_with(install: dict) -> None:
    """Run this script again, with the freshly installed torch first on the path (never returns)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (install["target"], env.get("PYTHONPATH")) if p)
    env[INSTALL_ENV] = json.dumps(install)
    print("== running again with the installed torch", flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, str(HERE), *sys.argv[1:]], env)


def gpu_present(environment: dict) -> bool:
    """Whether this machine has an NVIDIA GPU at all, whatever torch says."""
    return bool(environment.get("gpus")) or Path("/dev/nvidia0").exists()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: the same code paths, no verdicts")
    parser.add_argument("--out", type=Path, help="the results file (default benchmarks/results/gpu.json)")
    parser.add_argument(
        "--budget-s", type=float, help=f"time for all parts (default {BUDGET_S:.0f}; smoke {SMOKE_BUDGET_S:.0f})"
    )
    parser.add_argument("--memory-cap-gib", type=float, help="a batch whose peak memory is above this does not fit")
    parser.add_argument("--wheels", type=Path, help="install the pinned torch/torchaudio from wheels in this folder")
    parser.add_argument(
        "--work", type=Path, help="keep the parts' logs, data and runs here (default: a temporary folder)"
    )
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)  # runs one part (started by the parent)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    started = time.time()
    install = json.loads(os.environ[INSTALL_ENV]) if INSTALL_ENV in os.environ else None
    total = (args.budget_s or (SMOKE_BUDGET_S if args.smoke else BUDGET_S)) - (install or {}).get("seconds", 0.0)
    work = args.work or Path(tempfile.mkdtemp(prefix="fedhubert-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    statuses: dict[str, PartStatus] = {}
    carry = 0.0
    for part in PARTS:
        share = SHARES[part] * total
        budget = max(share + carry, 0.5 * share)
        statuses[part] = run_part(part, args, work, budget)
        carry = budget - statuses[part].seconds
        if part == "environment" and not args.smoke:
            environment = statuses[part].details.get("environment", {})
            if not environment.get("cuda_usable"):
                if args.work is None:
                    shutil.rmtree(work, ignore_errors=True)
                if not gpu_present(environment):
                    print(
                        "gpu: no NVIDIA GPU on this machine; nothing measured, no results written (--smoke checks "
                        "the code on CPU)"
                    )
                    return 0
                if install is None:
                    install = install_pinned(args.wheels)
                    if install["ok"]:
                        reexec_with(install)
                    why = "CUDA cannot be used, and installing the pinned torch failed (see install)"
                else:
                    why = "CUDA cannot be used, not even with the pinned torch installed"
                for rest in PARTS[1:]:
                    statuses[rest] = PartStatus("skipped", 0.0, 0.0, why=why)
                break
    if args.work is None and all(s.status == "ok" for s in statuses.values()):
        shutil.rmtree(work, ignore_errors=True)
    return report(args, statuses, install, work, time.time() - started)


def report(
    args: argparse.Namespace, statuses: dict[str, PartStatus], install: dict | None, work: Path, seconds: float
) -> int:
    """gpu.json and the table: every part's figures, and per part its status, budget and details. Exit code 1 when
    a part failed or could not run."""
    from _common import write_results

    sizes = SMOKE if args.smoke else GPU
    environment = statuses["environment"].details.get("environment", {})
    figures = [f for s in statuses.values() for f in s.figures]
    peak = statuses["environment"].details.get("peak", {})
    notes = (
        f"{'SMOKE (CPU, tiny sizes: no verdicts). ' if args.smoke else ''}{sizes.preset} preset, K={K}, bf16 autocast "
        f"over fp32 weights, crops of {sizes.crop_seconds:g} s, recipe batch {audio_label(sizes.recipe_crops, sizes)}; "
        f"device: {environment.get('gpu_name', environment.get('device'))}, torch {environment.get('torch')}, "
        f"MFU vs {peak.get('name', 'no peak')}; parts: "
        + ", ".join(f"{name} {s.status}" for name, s in statuses.items())
    )
    extra = {
        "smoke": args.smoke,
        "environment": environment,
        "install": install,
        "sizes": asdict(sizes),
        "seconds": round(seconds, 1),
        "work": str(work) if work.exists() else None,
        "parts": {name: {k: v for k, v in asdict(s).items() if k != "figures"} for name, s in statuses.items()},
    }
    write_results(NAME, figures, notes=notes, extra=extra, path=args.out)
    short = {name: s.status for name, s in statuses.items() if s.status != "ok"}
    print(f"gpu: {seconds:.0f} s; " + (f"not complete: {short}" if short else "every part completed"))
    return 1 if any(status in ("failed", "skipped") for status in short.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
