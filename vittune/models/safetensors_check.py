"""A safetensors file checked from its header before the safetensors library reads it.

The format is an 8-byte little-endian header length, a JSON header (tensor name -> dtype,
shape, byte offsets; an optional `__metadata__` of strings), then the tensor bytes. The
library maps and allocates from that header; a hostile or damaged file (a header length of
2^62, offsets past the end, a truncated export, a pickle or a text file renamed
`.safetensors`) gave `SafetensorError` tracebacks. Here every number in the header is
checked against the file's real size first, so nothing is allocated for a file that cannot
hold what it claims; the message names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from vittune.errors import WeightsError

MAX_HEADER = 100_000_000  # the safetensors library's own limit on the header
ITEM_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def _refuse(path: Path, what: str) -> WeightsError:
    return WeightsError(
        f"{path} is not a usable safetensors file: {what}; export the weights again or point"
        " model.pretrained at another file"
    )


def check_safetensors(path: Path) -> None:
    """Raise a one-line WeightsError unless the header fits the file and describes its bytes."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        start = handle.read(8)
        if len(start) < 8:
            raise _refuse(path, f"{size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", start)
        if length > min(MAX_HEADER, size - 8):
            raise _refuse(path, f"header length {length} but the file has {size} bytes")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _refuse(path, "the header is not JSON") from None
    if not isinstance(header, dict):
        raise _refuse(path, "the header is not a JSON object")
    data = size - 8 - length  # bytes after the header
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _refuse(path, "__metadata__ must map strings to strings")
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in ITEM_SIZE:
            raise _refuse(path, f"tensor {name!r} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise _refuse(path, f"tensor {name!r} has a bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data
        ):
            raise _refuse(
                path, f"tensor {name!r} lies outside the file (offsets {offsets!r}, {data} bytes)"
            )
        if (offsets[1] - offsets[0]) != math.prod(shape) * ITEM_SIZE[entry["dtype"]]:
            raise _refuse(path, f"tensor {name!r}: its offsets do not match its shape and dtype")
        spans.append(offsets)
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
        raise _refuse(path, "tensors overlap")
