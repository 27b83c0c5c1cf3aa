"""What travels in Flower messages: configs as ConfigRecords, arrays, and an audit log of every message.

The audit log (`messages.jsonl` in the run folder) lists, for each message to or from a client, the names,
shapes, dtypes and bytes of its arrays and the keys of its configs and metrics, so anyone can check what left
a client (for k-means: per-cluster statistics only, never frames or labels). What a message carries is written
once per schema (a `schema` row: its arrays, configs and metrics, named by a hash); each `message` row names its
schema and carries the totals (arrays, bytes), so a row stays ~200 bytes however many arrays a model has.
`read_messages` joins them back.
"""

from __future__ import annotations

import hashlib
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
    """Appends one JSON line per message sent to or received from a client, and one per new schema."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._schemas: set[str] = set()  # written by this log (a resumed run writes a schema again, once)

    def record(self, direction: str, message: Message, round_: int | None, client: int | None) -> None:
        entry = {
            "kind": "message",
            "time": round(time.time(), 3),
            "direction": direction,
            "type": message.metadata.message_type,
            "round": round_,
            "client": client,
            "node": message.metadata.dst_node_id if direction == "to_client" else message.metadata.src_node_id,
        }
        schema = None
        if message.has_error():
            entry["error"] = message.error.reason
        else:
            described = describe(message.content)
            schema = {key: described[key] for key in SCHEMA_KEYS}
            name = hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:16]
            entry.update(schema=name, num_arrays=len(schema["arrays"]), bytes=described["bytes"])
        with self._lock:
            lines = []
            if schema is not None and entry["schema"] not in self._schemas:
                self._schemas.add(entry["schema"])
                lines.append(json.dumps({"kind": "schema", "schema": entry["schema"], **schema}))
            lines.append(json.dumps(entry))
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write("".join(line + "\n" for line in lines))


SCHEMA_KEYS = ("arrays", "configs", "metrics")


def read_messages(path: Path) -> list[dict]:
    """The message rows of a messages.jsonl, each with its schema's arrays, configs and metrics joined in."""
    schemas: dict[str, dict] = {}
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("kind") == "schema":
            schemas[row["schema"]] = {key: row[key] for key in SCHEMA_KEYS}
        elif "schema" in row:
            rows.append({**row, **schemas[row["schema"]]})
        else:
            rows.append(row)
    return rows
