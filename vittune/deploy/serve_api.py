"""The LitServe API of `vittune serve`: decode each request, batch the good ones, answer each.

Imported only by `vittune serve` (it imports litserve). LitServe's batched loop decodes every
request of a batch inside one `try`, so an exception from `decode_request` would fail every
request of that batch. Here `decode_request` never raises for bad input: it returns a
`Refused` in the image's place, `predict` runs the model on the decodable images only and puts
each refusal back in its slot, and `encode_response` turns it into `{"error", "status"}`,
which the HTTP route answers as a 4xx. One bad image therefore costs only its own request.
"""

from __future__ import annotations

import logging
import warnings

import litserve as ls
import torch
from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from litserve.server import RegularRequestHandler, no_auth
from starlette.formparsers import MultiPartException, MultiPartParser

from vittune.deploy.serve_input import (
    FILE_FIELD,
    UNNAMED,
    Refused,
    body_kind,
    check_length,
    json_image,
    ranked_answer,
    require_bytes,
    too_large,
)
from vittune.deploy.serve_model import ServedModel, ServeOptions
from vittune.errors import DataError

logger = logging.getLogger("vittune.serve")


class VittuneAPI(ls.LitAPI):
    """One trained run behind LitServe: `setup` builds it in each worker process."""

    def __init__(
        self,
        options: ServeOptions,
        version: str,
        max_batch_size: int = 32,
        batch_timeout: float = 0.01,
    ) -> None:
        with warnings.catch_warnings():
            # LitServe warns when batch/unbatch are overridden and batching is off; they are
            # simply not called then (its single loop calls predict per request).
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.options, self.version = options, version
        self.model: ServedModel | None = None

    def setup(self, device: str) -> None:
        self.model = ServedModel(self.options, device)

    def decode_request(self, request: dict) -> torch.Tensor | Refused:
        """[C, H, W] of the request's image, or the `Refused` that the client will receive."""
        name = request.get("name", "<request body>")
        try:
            return self.model.preprocess(request["image"], name)
        except DataError as err:
            return Refused(400, " ".join(str(err).split()))
        except Exception as err:  # a decoder failing on client bytes: still only this request
            logger.warning("decoding %s failed: %r", name, err)
            return Refused(400, f"cannot decode image {name}: {type(err).__name__}: {err}")

    def batch(self, inputs: list) -> list:
        return list(inputs)  # stacked in predict, after the refusals are taken out

    def predict(self, x):
        """Batched: a list of tensors and refusals -> a list of [K] arrays and refusals."""
        items = x if self.max_batch_size > 1 else [x]
        good = [i for i, item in enumerate(items) if not isinstance(item, Refused)]
        outputs = list(items)
        if good:
            probs = self.model.probabilities(torch.stack([items[i] for i in good]))  # [G, K]
            for row, i in enumerate(good):
                outputs[i] = probs[row]
        return outputs if self.max_batch_size > 1 else outputs[0]

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output) -> dict:
        if isinstance(output, Refused):
            return {"error": output.message, "status": output.status}
        model, options = self.model, self.options
        return {
            "predictions": ranked_answer(
                output, model.classes, model.multi_label, options.top_k, options.threshold
            ),
            "probabilities": {c: float(p) for c, p in zip(model.classes, output, strict=True)},
            "model": model.run.folder.name,
            "version": self.version,
        }


async def read_image_request(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """(image bytes, name) from a request, or `Refused`; at most `max_bytes` are read."""
    kind = body_kind(request.headers.get("content-type"))
    check_length(request.headers.get("content-length"), max_bytes)
    body = bytearray()
    async for chunk in request.stream():  # also bounds chunked bodies with no Content-Length
        body += chunk
        if len(body) > max_bytes:
            raise Refused(413, too_large(max_bytes))
    if kind == "json":
        data, name = json_image(bytes(body))
        return require_bytes(data), name
    if kind == "raw":
        return require_bytes(bytes(body)), UNNAMED

    async def replay():
        yield bytes(body)

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=1, max_fields=8).parse()
    except MultiPartException as err:
        raise Refused(400, f"the multipart body does not parse ({err.message})") from None
    upload = form.get(FILE_FIELD)
    if upload is None or isinstance(upload, str):
        raise Refused(
            400, f"the multipart body has no file field {FILE_FIELD!r} (curl -F file=@x.png)"
        )
    return require_bytes(await upload.read()), upload.filename or UNNAMED


def add_predict_route(server, api, max_bytes: int) -> None:
    """Put vittune's `POST /predict` in the place of LitServe's.

    LitServe's own route reads only form or JSON bodies (it calls `request.json()` on anything
    else), so this one reads the body itself, bounded by `max_bytes`, refuses what is not an
    image request with a 4xx JSON error, and hands the bytes to LitServe's request queue.
    """
    routes = server.app.router.routes
    routes[:] = [r for r in routes if getattr(r, "path", None) != api.api_path]
    handler = RegularRequestHandler(api, server)

    async def predict(request: Request) -> JSONResponse:
        try:
            data, name = await read_image_request(request, max_bytes)
        except Refused as refused:
            return JSONResponse({"error": refused.message}, status_code=refused.status)
        # request_type=dict: LitServe queues the payload as it is (no form or JSON parsing).
        answer = dict(await handler.handle_request({"image": data, "name": name}, dict))
        return JSONResponse(answer, status_code=answer.pop("status", 200))

    # LitServe's auth (the LIT_SERVER_API_KEY variable) as on its own routes; its no-op
    # default is left out, as FastAPI would run it in a thread pool on every request
    auth = server.setup_auth(api)
    dependencies = [] if auth is no_auth else [Depends(auth)]
    server.app.add_api_route(api.api_path, predict, methods=["POST"], dependencies=dependencies)
