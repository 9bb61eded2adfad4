"""The OpenAPI document the local Cog server serves (/openapi.json, written by build_schema): valid
OpenAPI 3, and true to what coglet answers, checked by a schema-driven fuzzer against the real
server on the embedded model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from finetune.cog.cogtools import CogServer
from finetune.cog.schema import build_schema

ROOT = Path(__file__).resolve().parent.parent
# Not positive_data_acceptance: coglet 0.23.1 rejects an explicit null for a nullable input and a
# PUT whose body id differs from the path's, both with 422, which the document states in words only.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# Decoding runs at ~15 tokens/s on these CPUs, so a drawn max_new_tokens of 4096 (or the default
# 128) would spend minutes on one example. A fuzzed prediction asks for at most this many: the
# value stays inside the schema's 1..4096, so the case stays valid and every check still applies.
FUZZ_MAX_NEW_TOKENS = 4


def test_document_is_valid_openapi_3_and_complete():
    from openapi_spec_validator import validate

    doc = build_schema(ROOT)
    validate(doc)  # picks the OpenAPI 3.0 validator from "openapi": "3.0.2"
    schemas = doc["components"]["schemas"]
    assert {
        "Input",
        "Output",
        "PredictionRequest",
        "PredictionResponse",
        "TrainingInput",
        "TrainingOutput",
        "TrainingRequest",
        "TrainingResponse",
        "Status",
        "WebhookEvent",
        "HTTPValidationError",
        "ValidationError",
    } <= set(schemas)
    assert set(doc["paths"]) == {
        "/",
        "/health-check",
        "/predictions",
        "/predictions/{prediction_id}",
        "/predictions/{prediction_id}/cancel",
        "/trainings",
        "/trainings/{training_id}",
        "/trainings/{training_id}/cancel",
        "/shutdown",
    }
    for path, method, kind in [
        ("/predictions", "post", "Prediction"),
        ("/predictions/{prediction_id}", "put", "Prediction"),
        ("/trainings", "post", "Training"),
        ("/trainings/{training_id}", "put", "Training"),
    ]:
        op = doc["paths"][path][method]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{kind}Request"}
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{kind}Response"}
        invalid = op["responses"]["422"]["content"]["application/json"]["schema"]
        assert invalid == {"$ref": "#/components/schemas/HTTPValidationError"}
    request, response = (
        schemas["PredictionRequest"]["properties"],
        schemas["PredictionResponse"]["properties"],
    )
    assert request["input"] == {"$ref": "#/components/schemas/Input"}
    assert response["output"] == {"$ref": "#/components/schemas/Output"}
    assert response["status"] == {"$ref": "#/components/schemas/Status"}
    assert schemas["TrainingResponse"]["properties"]["output"] == {
        "$ref": "#/components/schemas/TrainingOutput"
    }
    assert doc["paths"]["/predictions"]["post"]["x-cog-streaming"] is True
    assert "x-cog-streaming" not in doc["paths"]["/trainings"]["post"]
    # Each side validates its own choices: train.py's prompt_template has no "auto".
    train_template = schemas["TrainingInput"]["properties"]["prompt_template"]["allOf"][0]["$ref"]
    assert "auto" in schemas["prompt_template"]["enum"]
    assert "auto" not in schemas[train_template.rsplit("/", 1)[1]]["enum"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_model_dir):
    with CogServer("predict", log_path=tmp_path_factory.mktemp("openapi") / "cog.log") as server:
        yield server


@pytest.fixture(scope="module")
def api(server):
    served = requests.get(f"{server.url}/openapi.json", timeout=30).json()
    assert served == build_schema(ROOT)  # coglet serves the document as written
    return schemathesis.openapi.from_dict(
        served, config=schemathesis.Config.from_dict({"base-url": server.url})
    )


def bound_case(case: Any) -> None:
    """Keep a fuzzed case short and local, without turning an invalid case into a valid one."""
    body = case.body
    if not isinstance(body, dict):
        return
    inputs = body.get("input")
    if case.path.startswith("/predictions") and isinstance(inputs, dict):
        limit = case.operation.schema.raw_schema["components"]["schemas"]["Input"]["properties"]
        tokens = inputs.get("max_new_tokens", FUZZ_MAX_NEW_TOKENS)
        if type(tokens) is int and 1 <= tokens <= limit["max_new_tokens"]["maximum"]:
            inputs["max_new_tokens"] = min(tokens, FUZZ_MAX_NEW_TOKENS)
    # coglet POSTs progress to `webhook`: keep the fuzzer from sending it to hosts it made up.
    if isinstance(body.get("webhook"), str):
        del body["webhook"]


POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# (operation, mode, examples). POST /shutdown is left out: it stops the server every other case
# runs against. /trainings gets only invalid input (422): a valid one would start a training of up
# to a million steps on a train server, and on this predict server it reaches the predictor and
# fails at once (test_train_service.py runs real trainings). Cancel and the GETs take no body, so
# there is nothing to make invalid.
FUZZ = [
    ("GET /", POSITIVE, 2),
    ("GET /health-check", POSITIVE, 2),
    ("POST /predictions", POSITIVE, 12),
    ("POST /predictions", NEGATIVE, 12),
    ("PUT /predictions/{prediction_id}", POSITIVE, 6),
    ("PUT /predictions/{prediction_id}", NEGATIVE, 6),
    ("POST /predictions/{prediction_id}/cancel", POSITIVE, 4),
    ("POST /trainings", NEGATIVE, 12),
    ("PUT /trainings/{training_id}", NEGATIVE, 6),
    ("POST /trainings/{training_id}/cancel", POSITIVE, 4),
]


def test_fuzzing_covers_every_operation_but_shutdown():
    documented = {f"{m.upper()} {path}" for path, ops in build_schema(ROOT)["paths"].items() for m in ops}
    assert {label for label, _, _ in FUZZ} == documented - {"POST /shutdown"}


# Each operation runs as a plain Hypothesis test on schemathesis' strategy for it: the pytest loader
# (schemathesis.pytest.from_fixture) sets Node._nodeid, which pytest 9 no longer has.
@pytest.mark.integration
@pytest.mark.parametrize(
    ("label", "mode", "examples"), FUZZ, ids=[f"{op} {mode.value}" for op, mode, _ in FUZZ]
)
def test_server_answers_as_documented(api, label: str, mode: GenerationMode, examples: int):
    method, path = label.split(" ")

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same cases on every run
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its case as drawn
        suppress_health_check=list(HealthCheck),
    )
    @given(case=api[path][method].as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        bound_case(case)
        case.call_and_validate(checks=CHECKS, timeout=120)

    fuzz()
