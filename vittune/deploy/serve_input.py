"""What `vittune serve` accepts on `POST /predict`, and how it answers: pure functions.

A request carries one image in one of three shapes: a multipart form with a `file` field
(`curl -F file=@x.png`), the file's bytes as the body (`Content-Type: image/png`,
`application/octet-stream`, `application/dicom`), or JSON `{"image": "<base64>"}`. Anything
else is refused with a status and a one-line message (`Refused`) before it reaches the model.
The answer is the run's top-k classes (multi-label: every label over the threshold), highest
probability first.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MULTIPART = "multipart/form-data"
JSON_TYPE = "application/json"
# Bodies that are the image file itself; image/* covers png, jpeg, tiff, bmp, webp.
RAW_TYPES = ("application/octet-stream", "application/dicom")
FILE_FIELD = "file"
UNNAMED = "<request body>"

HOW_TO_SEND = (
    "send the image as multipart/form-data (curl -F file=@image.png), as the body with"
    " Content-Type image/png, image/jpeg, image/tiff or application/octet-stream, or as JSON"
    ' {"image": "<base64>"}'
)


@dataclass
class Refused(Exception):
    """A request the server will not run: the HTTP status and a message naming the problem."""

    status: int
    message: str

    def __str__(self) -> str:
        return self.message


def media_type(content_type: str | None) -> str:
    """`multipart/form-data; boundary=x` -> `multipart/form-data` (lower case, no parameters)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def body_kind(content_type: str | None) -> str:
    """ "multipart", "json" or "raw" for an accepted Content-Type; `Refused` (415) otherwise."""
    kind = media_type(content_type)
    if kind == MULTIPART:
        return "multipart"
    if kind == JSON_TYPE or kind.endswith("+json"):
        return "json"
    if kind.startswith("image/") or kind in RAW_TYPES:
        return "raw"
    shown = kind or "none"
    raise Refused(415, f"Content-Type {shown} is not accepted; {HOW_TO_SEND}")


def check_length(declared: str | None, max_bytes: int) -> None:
    """Refuse a body whose Content-Length is over the limit before reading a byte of it."""
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise Refused(400, f"Content-Length {declared!r} is not a number") from None
    if length > max_bytes:
        raise Refused(413, too_large(max_bytes))


def too_large(max_bytes: int) -> str:
    return (
        f"the request body is over {max_bytes / 2**20:g} MiB (--max-body-mb); send a smaller"
        " image or start the server with a larger --max-body-mb"
    )


def json_image(body: bytes) -> tuple[bytes, str]:
    """(image bytes, name) from a JSON body `{"image": "<base64>", "name": optional}`."""
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Refused(400, f"the JSON body does not parse ({err})") from None
    encoded = document.get("image") if isinstance(document, dict) else None
    if not isinstance(encoded, str):
        raise Refused(400, 'the JSON body needs a string field "image" holding the base64 file')
    if encoded.startswith("data:") and "," in encoded:  # a data URL: data:image/png;base64,...
        encoded = encoded.split(",", 1)[1]
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(400, 'the "image" field is not valid base64') from None
    name = document.get("name")
    return data, name if isinstance(name, str) and name else UNNAMED


def require_bytes(data: bytes) -> bytes:
    if not data:
        raise Refused(400, f"the request holds no image bytes; {HOW_TO_SEND}")
    return data


def ranked_answer(
    probs: np.ndarray,
    classes: Sequence[str],
    multi_label: bool,
    top_k: int,
    threshold: float | Sequence[float],
) -> list[dict[str, float | str]]:
    """`[{"class": name, "probability": p}, ...]` for one image's [K] probabilities.

    Single-label: the `top_k` most probable classes, highest first (ties keep class order, as
    in predict's CSV). Multi-label: every label over its threshold, highest first.
    """
    probs = np.asarray(probs, dtype=np.float64)  # [K]
    if multi_label:
        limits = np.broadcast_to(np.asarray(threshold, dtype=np.float64), probs.shape)
        chosen = np.flatnonzero(probs > limits)  # [L]
        order = chosen[np.argsort(-probs[chosen], kind="stable")]
    else:
        order = np.argsort(-probs, kind="stable")[: min(top_k, len(classes))]
    return [{"class": classes[c], "probability": float(probs[c])} for c in order]
