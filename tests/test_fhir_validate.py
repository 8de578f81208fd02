"""engine/fhir/validate.py without a running engine: the nesting limit told from the JSON text."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from engine.fhir.outcome import FhirError
from engine.fhir.validate import MAX_DEPTH, nesting_depth, parse_json, text_deeper_than

TRICKY = ('[[{{', '}}]]', '\\"[{', 'ü{[', '"', '\\', '\u2028')  # brackets, quotes and escapes inside strings


def _nested(depth: int) -> dict[str, Any]:
    """A resource whose objects nest ``depth`` deep, with strings full of brackets."""
    top: dict[str, Any] = {"resourceType": "Patient", "text": "[[[{{{" * 40}
    cur = top
    for _ in range(depth - 1):
        cur["extension"] = {"url": "}]}]" * 3, "valueString": '\\"{['}
        cur = cur["extension"]
    return top


def _random(rng: random.Random, depth: int) -> Any:
    if depth <= 0 or rng.random() < 0.15:
        return rng.choice([*TRICKY, 1, 2.5, None, True])
    if rng.random() < 0.5:
        return [_random(rng, depth - 1) for _ in range(rng.randrange(0, 3))]
    return {rng.choice(TRICKY) + str(i): _random(rng, depth - 1) for i in range(rng.randrange(0, 3))}


@pytest.mark.parametrize("depth", [1, 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 3 * MAX_DEPTH])
def test_text_depth_is_the_parsed_depth_whatever_the_strings_hold(depth: int) -> None:
    data = _nested(depth)
    for body in (json.dumps(data).encode(), json.dumps(data, ensure_ascii=False, indent=1).encode(),
                 b"\xef\xbb\xbf" + json.dumps(data).encode()):
        assert text_deeper_than(body, MAX_DEPTH) == (nesting_depth(data) > MAX_DEPTH) == (depth > MAX_DEPTH)


def test_text_depth_agrees_with_the_walk_on_random_documents() -> None:
    rng = random.Random(18)
    for _ in range(400):
        data = _random(rng, rng.randrange(0, 40))
        body = json.dumps(data, ensure_ascii=rng.random() < 0.5).encode()
        for limit in (0, 1, 3, 10):
            assert text_deeper_than(body, limit) == (nesting_depth(data) > limit), body


def test_text_that_is_not_utf8_is_left_to_the_walk() -> None:
    body = json.dumps(_nested(MAX_DEPTH + 1)).encode("utf-16")
    assert text_deeper_than(body, MAX_DEPTH) is None
    with pytest.raises(FhirError, match="deeper than 100 levels"):
        parse_json(body)  # json.loads reads UTF-16: the walk over the parsed objects still refuses it
    assert parse_json(json.dumps(_nested(3)).encode("utf-16"))["resourceType"] == "Patient"


def test_parse_json_refuses_too_deep_and_takes_the_limit() -> None:
    assert parse_json(json.dumps(_nested(MAX_DEPTH)).encode())["resourceType"] == "Patient"
    with pytest.raises(FhirError, match="deeper than 100 levels"):
        parse_json(json.dumps(_nested(MAX_DEPTH + 1)).encode())
