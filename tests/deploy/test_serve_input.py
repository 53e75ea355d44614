"""What `POST /predict` accepts and how it ranks an answer: the pure functions of serve_input,
the ranking checked against predict's CSV rows (the reference for the same probabilities)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from vittune.deploy.serve_input import (
    UNNAMED,
    Refused,
    body_kind,
    check_length,
    json_image,
    ranked_answer,
    require_bytes,
)
from vittune.errors import RecipeError
from vittune.evaluation.prediction_csv import prediction_rows


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("multipart/form-data; boundary=xyz", "multipart"),
        ("application/json", "json"),
        ("application/json; charset=utf-8", "json"),
        ("image/png", "raw"),
        ("IMAGE/JPEG", "raw"),
        ("image/tiff", "raw"),
        ("application/octet-stream", "raw"),
        ("application/dicom", "raw"),
    ],
)
def test_accepted_content_types(content_type: str, kind: str) -> None:
    assert body_kind(content_type) == kind


@pytest.mark.parametrize(
    "content_type", [None, "", "text/plain", "application/x-www-form-urlencoded", "video/mp4"]
)
def test_other_content_types_are_415_naming_the_type(content_type: str | None) -> None:
    with pytest.raises(Refused) as refused:
        body_kind(content_type)
    assert refused.value.status == 415
    assert f"Content-Type {content_type or 'none'} is not accepted" in refused.value.message
    assert "curl -F file=@image.png" in refused.value.message


def test_declared_length_over_the_limit_is_413_before_reading() -> None:
    check_length(None, 10)  # chunked: bounded while reading instead
    check_length("10", 10)
    with pytest.raises(Refused) as refused:
        check_length("11", 10)
    assert refused.value.status == 413 and "--max-body-mb" in refused.value.message
    with pytest.raises(Refused) as refused:
        check_length("ten", 10)
    assert refused.value.status == 400


def test_json_image_reads_base64_and_data_urls() -> None:
    data = bytes(range(256))
    encoded = base64.b64encode(data).decode()
    assert json_image(json.dumps({"image": encoded}).encode()) == (data, UNNAMED)
    url = json.dumps({"image": f"data:image/png;base64,{encoded}", "name": "x.png"}).encode()
    assert json_image(url) == (data, "x.png")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "does not parse"),
        (b'["image"]', 'string field "image"'),
        (b'{"img": "AAAA"}', 'string field "image"'),
        (b'{"image": 3}', 'string field "image"'),
        (b'{"image": "not base64!"}', "not valid base64"),
    ],
)
def test_bad_json_bodies_are_400_naming_the_problem(body: bytes, words: str) -> None:
    with pytest.raises(Refused) as refused:
        json_image(body)
    assert refused.value.status == 400 and words in refused.value.message


def test_an_empty_image_is_refused() -> None:
    with pytest.raises(Refused) as refused:
        require_bytes(b"")
    assert refused.value.status == 400 and "no image bytes" in refused.value.message


def test_single_label_ranking_matches_the_predict_csv() -> None:
    rng = np.random.default_rng(0)
    classes = [f"c{i}" for i in range(6)]
    probs = rng.dirichlet(np.ones(6), size=20).astype(np.float32)  # [20, 6]
    probs[0] = [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]  # a tie: the first class first, as argmax
    rows = prediction_rows(["x"] * 20, probs, classes, top_k=4)
    for row, p in zip(rows, probs, strict=True):
        answer = ranked_answer(p, classes, False, 4, 0.5)
        assert [a["class"] for a in answer] == [row[f"top{i}_class"] for i in range(1, 5)]
        assert [a["probability"] for a in answer] == pytest.approx(
            [float(row[f"top{i}_prob"]) for i in range(1, 5)], abs=1e-6
        )
        assert answer[0]["probability"] == float(p.max())


def test_multi_label_lists_labels_over_their_thresholds_highest_first() -> None:
    classes = ["a", "b", "c", "d"]
    probs = np.array([0.6, 0.2, 0.9, 0.55])
    answer = ranked_answer(probs, classes, True, 3, 0.5)
    assert [a["class"] for a in answer] == ["c", "a", "d"]  # all over 0.5, top_k not applied
    per_label = ranked_answer(probs, classes, True, 3, [0.7, 0.1, 0.95, 0.5])
    assert [a["class"] for a in per_label] == ["d", "b"]
    labels = prediction_rows(["x"], probs[None], classes, multi_label=True)[0]["labels"]
    assert set(labels.split(";")) == {a["class"] for a in answer}


GOOD = dict(
    host="127.0.0.1", port=8000, fmt="torch", max_batch_size=32, batch_timeout=0.01, workers=1,
    device="auto", max_body_mb=10.0, top_k=3, threshold=0.5,
)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"host": "localhost"}, "--host must be one of 127.0.0.1, 0.0.0.0, ::"),
        ({"port": 80}, "--port must be between 1024 and 65535"),
        ({"fmt": "torchscript"}, "--format must be one of torch, onnx"),
        ({"max_batch_size": 0}, "--max-batch-size must be at least 1"),
        ({"batch_timeout": -0.1}, "--batch-timeout must be 0 or more seconds"),
        ({"workers": 0}, "--workers must be at least 1"),
        ({"device": "tpu"}, "--device must be one of auto, cpu, cuda"),
        ({"max_body_mb": 0}, "--max-body-mb must be positive"),
        ({"top_k": 0}, "--top-k must be at least 1"),
        ({"threshold": 1.0}, "--threshold must be between 0 and 1"),
    ],
)
def test_serve_option_mistakes_name_the_option(change: dict, words: str) -> None:
    from vittune.deploy.serve import check_options

    check_options(**GOOD)
    with pytest.raises(RecipeError, match=f"^{re.escape(words)}, got "):
        check_options(**{**GOOD, **change})
