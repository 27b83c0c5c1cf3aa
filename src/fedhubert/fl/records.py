"""What travels in Flower messages: configs as ConfigRecords, arrays, and an audit log of every message.

The audit log (`messages.jsonl` in the run folder) lists, for each message to or from a client, the names,
shapes, dtypes and bytes of its arrays and the keys of its configs and metrics, so anyone can check what left
a client (for k-means: per-cluster statistics only, never frames or labels).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedhubert.config import config_from_dict, config_to_dict

T = TypeVar("T")
_NULLS = "__null__"  # keys whose value is None (a ConfigRecord holds no None)
_JSON = "__json__"  # keys whose value is JSON text (a ConfigRecord holds no nested lists)


def config_to_record(cfg: Any) -> ConfigRecord:
    """Flatten a config dataclass to dotted keys; None values and nested lists are marked (see above)."""
    flat: dict[str, Any] = {}
    nulls: list[str] = []
    as_json: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        elif value is None:
            nulls.append(prefix[:-1])
        elif isinstance(value, list) and (not value or any(isinstance(v, (list, dict)) for v in value)):
            flat[prefix[:-1]] = json.dumps(value)
            as_json.append(prefix[:-1])
        else:
            flat[prefix[:-1]] = value

    walk("", config_to_dict(cfg))
    if nulls:
        flat[_NULLS] = nulls
    if as_json:
        flat[_JSON] = as_json
    return ConfigRecord(flat)


def config_from_record(cls: type[T], record: ConfigRecord) -> T:
    nested: dict[str, Any] = {}
    items = dict(record)
    for key in items.pop(_NULLS, []):
        items[key] = None
    for key in items.pop(_JSON, []):
        items[key] = json.loads(items[key])
    for key, value in items.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = list(value) if isinstance(value, list) else value
    return config_from_dict(cls, nested, "config received from the server")


def arrays(**named: np.ndarray) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in named.items()})


def numpy_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def describe(content: RecordDict) -> dict:
    """Names, shapes, dtypes and sizes of what a message carries (not the values)."""
    out: dict[str, Any] = {"arrays": {}, "configs": {}, "metrics": {}, "bytes": 0}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                size = len(array.data)
                out["arrays"][f"{name}.{key}"] = {"shape": list(array.shape), "dtype": array.dtype, "bytes": size}
                out["bytes"] += size
        elif isinstance(record, ConfigRecord):
            out["configs"][name] = sorted(record.keys())
        elif isinstance(record, MetricRecord):
            out["metrics"][name] = sorted(record.keys())
    return out


class MessageLog:
    """Appends one JSON line per message sent to or received from a client."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, direction: str, message: Message, round_: int | None, client: int | None) -> None:
        entry = {
            "time": round(time.time(), 3),
            "direction": direction,
            "type": message.metadata.message_type,
            "round": round_,
            "client": client,
            "node": message.metadata.dst_node_id if direction == "to_client" else message.metadata.src_node_id,
        }
        if message.has_error():
            entry["error"] = message.error.reason
        else:
            entry.update(describe(message.content))
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
