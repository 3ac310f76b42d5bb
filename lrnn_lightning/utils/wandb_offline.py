"""Read back what an offline W&B run recorded, without uploading it.

An offline run keeps its history in `run-<id>.wandb`, a LevelDB-style log of protobuf
records (32 KiB blocks; each record has a 7-byte header: CRC32, length, type; long
records are split FIRST/MIDDLE/LAST across blocks) after a 7-byte file header. This
reader lets tests and users check a run's metrics and media before `wandb sync`.

Example:
    >>> run = read_offline_run("logs/train/runs/<time>/wandb/offline-run-...")
    >>> run.history[-1]["rollout/nrmse"], run.config["model"]["name"]
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """History rows (one dict per `log` call, keys joined with '/'), the final config and the media files."""

    run_dir: Path
    run_id: str
    name: str = ""
    group: str = ""
    project: str = ""
    tags: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def values(self, key: str) -> list[Any]:
        """Every logged value of `key`, in order."""
        return [row[key] for row in self.history if key in row]


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run log (bad header {data[:4]!r}).")
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        pos += _HEADER
        chunk = data[pos:pos + length]
        pos += length
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            records.append(pending + chunk)
            pending = b""
        else:  # zero padding at the end of the file
            break
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _set_nested(target: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Parse `run_dir` (a `wandb/offline-run-*` directory).

    Values in the history are decoded from JSON: numbers stay numbers; media (images,
    tables, charts) appear as nested keys such as `<key>/_type` and `<key>/path`.
    """
    from wandb.proto import wandb_internal_pb2

    run_dir = Path(run_dir)
    logs = sorted(run_dir.glob("run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"No run-*.wandb file in {run_dir}. HINT: pass a wandb/offline-run-* directory.")
    run = OfflineRun(run_dir=run_dir, run_id=logs[0].stem.removeprefix("run-"))
    for raw in _records(logs[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                keys = list(item.nested_key) or [item.key]
                _set_nested(run.config, keys, json.loads(item.value_json))
        elif kind == "run":
            run.name, run.group = record.run.display_name, record.run.run_group
            run.project, run.tags = record.run.project, list(record.run.tags)
            for item in record.run.config.update:
                keys = list(item.nested_key) or [item.key]
                _set_nested(run.config, keys, json.loads(item.value_json))
    files_dir = run_dir / "files"
    run.files = sorted(p for p in files_dir.rglob("*") if p.is_file()) if files_dir.is_dir() else []
    return run
