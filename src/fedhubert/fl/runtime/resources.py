"""What each simulated client may use: CPU cores and a share of a GPU.

Totals come from Slurm's environment when the run is a Slurm job (SLURM_CPUS_PER_TASK or SLURM_CPUS_ON_NODE,
SLURM_GPUS_ON_NODE / CUDA_VISIBLE_DEVICES), else from the machine. Without explicit settings, cores are shared
out over the clients that can run at once, and a client's GPU share is set so that as many clients share a GPU as
fit in its memory by the caller's estimate of one client's needs; Ray then never packs more onto a GPU.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from fedhubert.fl.config import FederationConfig
from fedhubert.model.config import ModelConfig
from fedhubert.parallel import available_cpus
from fedhubert.train.config import TrainConfig

log = logging.getLogger(__name__)

# What a client's CUDA context and allocator take besides its tensors, by allowance.
CUDA_CONTEXT_BYTES = 768 * 2**20


@dataclass(frozen=True)
class SimulationResources:
    cpus_per_client: int
    gpus_per_client: float
    total_cpus: int
    total_gpus: int
    workers: int  # clients that train at once (Flower's client actors)

    def federation_config(self, num_supernodes: int) -> str:
        """The `flwr run --federation-config` value for this simulation."""
        return (
            f"num-supernodes={num_supernodes} client-resources-num-cpus={self.cpus_per_client} "
            f"client-resources-num-gpus={self.gpus_per_client} init-args-num-cpus={self.total_cpus} "
            f"init-args-num-gpus={self.total_gpus}"
        )


def detect_cpus() -> int:
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return available_cpus()


def detect_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    slurm = os.environ.get("SLURM_GPUS_ON_NODE", "")
    if slurm.isdigit():
        return int(slurm)
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def gpu_memory_bytes() -> int:
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory)


def estimate_client_gpu_bytes(
    train: TrainConfig, shape: ModelConfig, *, trained: int, frozen: int = 0, num_classes: int = 0
) -> int:
    """One client's GPU memory by estimate: 16 bytes per trained parameter (weights, gradients, AdamW moments), 4
    per frozen one (weights for inference only), the activations of a `shape` model for a batch of the longest
    crops under `train`'s settings, and a CUDA context allowance."""
    from fedhubert.train.memory import estimate_activation_bytes

    crop = int(train.data.max_seconds * 16000)
    batch = max(1, int(train.data.batch_seconds * 16000) // crop)
    activations = estimate_activation_bytes(
        shape,
        batch,
        crop,
        num_classes=num_classes,
        precision=train.precision,
        checkpoint_layers=train.checkpoint_layers,
        checkpoint_cnn=train.checkpoint_cnn,
    )
    return 16 * trained + 4 * frozen + activations + CUDA_CONTEXT_BYTES


def simulation_resources(
    federation: FederationConfig, num_clients: int, client_gpu_bytes: int | None = None
) -> SimulationResources:
    """Resources per simulated client; `client_gpu_bytes` is the caller's estimate of one client's GPU memory."""
    cpus, gpus = detect_cpus(), detect_gpus()
    if federation.gpus_per_client is not None:
        gpu_share = federation.gpus_per_client
    elif gpus == 0 or client_gpu_bytes is None:
        gpu_share = 0.0 if gpus == 0 else 1.0
    else:
        fit = max(1, int(0.9 * gpu_memory_bytes() // client_gpu_bytes))
        gpu_share = 1.0 / fit
        log.info("about %.1f GiB per client: %d client(s) per GPU", client_gpu_bytes / 2**30, fit)
    concurrent = num_clients if gpu_share == 0 else max(1, min(num_clients, int(math.floor(gpus / gpu_share + 1e-9))))
    cpu_share = federation.cpus_per_client or max(1, cpus // max(1, min(concurrent, cpus)))
    workers = max(1, min(concurrent, cpus // cpu_share))
    return SimulationResources(cpu_share, round(gpu_share, 4), cpus, gpus, workers)


def supernodes(federation: FederationConfig, num_clients: int, resources: SimulationResources) -> int:
    """How many SuperNodes a simulation starts: one per client without virtual clients; with them
    `federation.supernodes`, or twice the clients that train at once (Flower's dispatcher hands each node one
    message per 0.1 s, so a few nodes keep every worker fed while its cost per sweep stays small), at most the
    clients."""
    if not federation.virtual():
        return num_clients
    return min(num_clients, federation.supernodes or 2 * resources.workers)
