"""How a federated stage reaches its clients (kept free of Flower imports: the CLI reads it for --help)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fedhubert.config import param


@dataclass
class FederationConfig:
    superlink: Optional[str] = param(
        None, "host:port of a running SuperLink (Flower's deployment engine); null: a private local simulation"
    )
    root_certificates: Optional[Path] = param(
        None, "CA certificate for TLS to that SuperLink; null: an insecure connection"
    )
    cpus_per_client: int = param(1, "simulation: CPU cores reserved for each client", ge=1)
    gpus_per_client: float = param(0.0, "simulation: share of a GPU reserved for each client", ge=0)
    timeout_s: float = param(7200.0, "stop a run that has not finished after this many seconds", gt=0)
