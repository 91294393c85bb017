"""TensorBoard scalars written during a run, one event file per round under <run>/tensorboard/.

The round loop calls `write_round_scalars` after every completed round with the run's logs; only that
round's rows are written, so a resumed run continues the same curves. Steps: local epochs done so far
(round * E + epoch) for per-epoch values, the round for per-round values. The `tensorboard` package is
optional: without it the scalars are skipped with a one-line notice (metrics.csv holds the same numbers).
"""

from __future__ import annotations

import functools
import io
import math
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medfl.checkpoints import atomic_write_bytes

DET_CODES = {"recover": 0, "exchange": 1, "sublimate": 2}


@functools.cache
def summary_writer_class() -> type | None:
    """torch's SummaryWriter, or None (with a notice printed once) when `tensorboard` is not installed: whether
    scalars can be written (they are written with the same protobufs, see `event_file`)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("medfl: the tensorboard package is not installed; TensorBoard scalars are skipped "
              "(pip install tensorboard)", file=sys.stderr)
        return None
    return SummaryWriter


def round_scalars(
    round_: int,
    local_epochs: int,
    metric_rows: Sequence[Mapping[str, Any]],
    det_rows: Sequence[Mapping[str, Any]],
    retrogress_rows: Sequence[Mapping[str, Any]],
    timing_rows: Sequence[Mapping[str, Any]] = (),
) -> list[tuple[str, float, int]]:
    """(tag, value, step) of one round: validation metrics per epoch, test metrics, DET states and losses,
    retrogress and recovery, timing. Validation right after communication (epoch 0) has its own tags."""
    scalars: list[tuple[str, float, int]] = []
    for row in metric_rows:
        if row["round"] != round_:
            continue
        name = f"{row['metric']}/{row['site']}/{row['model']}"
        if row["split"] == "test":
            scalars.append((f"test/{name}", row["value"], round_))
        elif row["epoch"] == 0:
            scalars.append((f"val_after_communication/{name}", row["value"], round_))
        else:
            scalars.append((f"val/{name}", row["value"], round_ * local_epochs + row["epoch"]))
    for row in det_rows:
        if row["round"] != round_:
            continue
        step = round_ * local_epochs + row["epoch"]
        if row.get("state") in DET_CODES:
            scalars.append((f"det_state/{row['site']}", DET_CODES[row["state"]], step))
        scalars += [(f"loss/{row['site']}/{key[5:]}", value, step) for key, value in row.items()
                    if key.startswith("loss_")]
    for row in retrogress_rows:
        if row["round"] == round_:
            scalars += [(f"{key}/{row['site']}", row[key], round_) for key in ("retrogress", "recovery") if key in row]
    for row in timing_rows:
        if row["round"] == round_:
            scalars += [(f"timing/{key}", value, round_) for key, value in row.items() if key != "round"]
    return [(tag, float(value), step) for tag, value, step in scalars
            if value is not None and not math.isnan(float(value))]


def write_round_scalars(
    log_dir: str | Path,
    round_: int,
    local_epochs: int,
    metric_rows: Sequence[Mapping[str, Any]],
    det_rows: Sequence[Mapping[str, Any]],
    retrogress_rows: Sequence[Mapping[str, Any]],
    timing_rows: Sequence[Mapping[str, Any]] = (),
) -> Path | None:
    """Write round ``round_``'s scalars into ``log_dir`` (a run's tensorboard/ folder) and return it (None
    without the tensorboard package)."""
    if summary_writer_class() is None:
        return None
    scalars = round_scalars(round_, local_epochs, metric_rows, det_rows, retrogress_rows, timing_rows)
    now = time.time()
    name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}.round{round_:04d}"
    atomic_write_bytes(Path(log_dir) / name, event_file(scalars, now))
    return Path(log_dir)


def event_file(scalars: Sequence[tuple[str, float, int]], wall_time: float) -> bytes:
    """The bytes of a TensorBoard event file holding `scalars` (tag, value, step), as SummaryWriter writes
    them (its add_scalar's summaries, after the file-version event), made in memory so that the file is
    written like every other file of a run folder: atomically, and a full disk is one line naming it."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter
    from torch.utils.tensorboard.summary import scalar

    buffer = io.BytesIO()
    records = RecordWriter(buffer)
    records.write(Event(wall_time=wall_time, file_version="brain.Event:2").SerializeToString())
    for tag, value, step in scalars:
        records.write(Event(wall_time=wall_time, step=step, summary=scalar(tag, value)).SerializeToString())
    return buffer.getvalue()
