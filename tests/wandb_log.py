"""Reading an offline W&B run's records, as `wandb sync` does, without a network.

wandb 0.31 writes an offline run as one `.wandb` transaction log (its Python reader moved into
wandb-core): leveldb-log blocks of 32 KiB after a 7-byte file header, each record a 7-byte
header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) and a protobuf
`Record` of wandb's own `wandb_internal_pb2`.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2


def wandb_records(run_dir: Path) -> list[wandb_internal_pb2.Record]:
    (log,) = (run_dir / "wandb").glob("offline-run-*/*.wandb")
    data, records, pending, pos = log.read_bytes(), [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4) and pending:
            records.append(wandb_internal_pb2.Record.FromString(pending))
        if kind in (0, 1, 4):
            pending = b""
    return records
