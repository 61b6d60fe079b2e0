"""Metrics sinks: TensorBoard event files (tensorboardX) and a JSONL file, written by process 0 only."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax


class MetricsLogger:
    """``log(step, {name: scalar})`` -> ``<log_dir>/metrics.jsonl`` and TensorBoard events in ``log_dir``.

    On resume, call :meth:`truncate_after` with the restored step so that lines from an interrupted
    run past that step do not appear twice.
    """

    def __init__(self, log_dir: str | os.PathLike | None, enabled: bool | None = None, tensorboard: bool = True):
        self.enabled = (jax.process_index() == 0) if enabled is None else enabled
        self.enabled = self.enabled and log_dir is not None
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self._jsonl = None
        self._tb = None
        self._tb_wanted = tensorboard
        if self.enabled:
            os.makedirs(self.log_dir, exist_ok=True)
            self.jsonl_path = os.path.join(self.log_dir, "metrics.jsonl")

    def _open(self):
        if self._jsonl is None:
            self._jsonl = open(self.jsonl_path, "a", buffering=1)
        if self._tb is None and self._tb_wanted:
            from tensorboardX import SummaryWriter
            # Event files are named by wall-clock SECOND and host: a run resumed within the same second
            # would overwrite the first run's file, so every writer gets its own suffix.
            self._tb = SummaryWriter(self.log_dir, flush_secs=10,
                                     filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not os.path.exists(self.jsonl_path):
            return
        keep = []
        with open(self.jsonl_path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
        with open(self.jsonl_path, "w") as f:
            f.writelines(keep)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self._open()
        row = {"step": int(step)}
        for k, v in metrics.items():
            try:
                fv = float(v)
            except (TypeError, ValueError):
                continue
            row[k] = fv if math.isfinite(fv) else str(fv)
            if self._tb is not None and math.isfinite(fv):
                self._tb.add_scalar(k, fv, int(step))
        self._jsonl.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def read_tensorboard_scalars(log_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from every TensorBoard event file in ``log_dir`` (no TensorFlow).

    Event files are TFRecord streams (``uint64 length, uint32 crc, payload, uint32 crc``) of ``Event``
    protos; this reads them with tensorboardX's own protos, for tests and for plots from a finished run.
    """
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(log_dir)):
        if not name.startswith("events.out.tfevents"):
            continue
        with open(os.path.join(log_dir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + n]
            pos += 12 + n + 4
            if len(payload) < n:
                break  # a record cut by a kill
            ev = event_pb2.Event.FromString(payload)
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
    return out
