"""The OpenAPI document that `cog build` would write into the image (.cog/openapi_schema.json),
built here from predict.py and train.py because the project runs the Cog server without the Cog CLI
or Docker. coglet serves it as /openapi.json and validates requests against it, so it must match
what the CLI generates (plus what coglet 0.23.1 answers beyond it). The server and client that use
it live in cogtools.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..config import PROJECT_ROOT
from ..staging import staged_file

SCHEMA_PATH = Path(".cog") / "openapi_schema.json"
PREDICTOR_REF = "predict.py:Predictor"
TRAINER_REF = "train.py:train"


# The document follows the Cog CLI's generator (pkg/schema/openapi_spec.go in the cog repository:
# predict and train schemas built alike, then merged) and adds what coglet 0.23.1 serves beyond
# it, checked against the running server: the idempotent PUTs, /shutdown, the `prefer` header,
# 202 (async), 400/415 (a body that is not JSON), 404 (cancel of an unknown id), 406 (SSE asked of
# /trainings), 409 (every slot busy), 503 (setup not finished), SSE, and the text/plain 422 coglet
# sends when the envelope itself has a wrong type.
REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def _input_schema(inputs: dict[str, Any], title: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cog's input object and, as Cog does, one enum component per input with choices, named
    after the input."""
    from cog._adt import Repetition

    properties: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    required: list[str] = []
    for name, f in inputs.items():
        prop: dict[str, Any] = {"x-order": f.order}
        if f.choices:
            enum_type = f.type.primitive.json_type().get("type", "string")
            enums[name] = {
                "title": name,
                "description": "An enumeration.",
                "enum": f.choices,
                "type": enum_type,
            }
            prop["allOf"] = [_ref(name)]
        else:
            prop["title"] = name.replace("_", " ").title()
            prop.update(f.type.json_type())
        is_optional = f.type.repetition in (Repetition.OPTIONAL, Repetition.OPTIONAL_REPEATED)
        if f.default is None and not is_optional:
            required.append(name)
        if f.default is not None and not hasattr(f.default, "__dataclass_fields__"):
            prop["default"] = f.default
        if is_optional:
            prop["nullable"] = True
        if f.description:
            prop["description"] = f.description
        for key, value in (
            ("minimum", f.ge),
            ("maximum", f.le),
            ("minLength", f.min_length),
            ("maxLength", f.max_length),
            ("pattern", f.regex),
        ):
            if value is not None:
                # Cog keeps bounds as floats: an integer input's bound is written as the integer it is
                # (a seed's bound as 9223372036854774784, not 9.223372036854776e+18).
                prop[key] = (
                    int(value) if prop.get("type") == "integer" and float(value).is_integer() else value
                )
        if f.deprecated:
            prop["deprecated"] = True
        properties[name] = prop
    schema: dict[str, Any] = {"title": title, "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def _envelopes(kind: str, input_name: str, output_name: str, input_required: bool) -> dict[str, Any]:
    """{Prediction,Training}{Request,Response}: the fields coglet reads from a request (its
    PredictionRequest struct: id, input, context, webhook, webhook_events_filter) and those it
    answers with (the timestamps are in Cog's document; coglet 0.23.1 omits them, and sends input
    only while a prediction runs). `input` is required where the input has required fields: coglet
    reads a missing one as {} and answers 422, which Cog's document leaves unsaid."""
    time_field = {"type": "string", "format": "date-time"}
    request: dict[str, Any] = {
        "title": f"{kind}Request",
        "type": "object",
        "properties": {
            "id": {"title": "Id", "type": "string"},
            "input": _ref(input_name),
            "context": {"title": "Context", "type": "object", "additionalProperties": {"type": "string"}},
            "webhook": {"title": "Webhook", "type": "string", "format": "uri"},
            "webhook_events_filter": {
                "title": "Webhook Events Filter",
                "type": "array",
                "items": _ref("WebhookEvent"),
                "default": ["start", "output", "logs", "completed"],
            },
        },
    }
    if input_required:
        request["required"] = ["input"]
    return {
        f"{kind}Request": request,
        f"{kind}Response": {
            "title": f"{kind}Response",
            "type": "object",
            "properties": {
                "input": _ref(input_name),
                "output": _ref(output_name),
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": {"title": "Created At", **time_field},
                "started_at": {"title": "Started At", **time_field},
                "completed_at": {"title": "Completed At", **time_field},
                "status": _ref("Status"),
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string", "default": ""},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
    }


COMMON_SCHEMAS: dict[str, Any] = {
    "Status": {
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    },
    "WebhookEvent": {
        "title": "WebhookEvent",
        "description": "An enumeration.",
        "enum": ["start", "output", "logs", "completed"],
        "type": "string",
    },
    "HTTPValidationError": {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {"detail": {"title": "Detail", "type": "array", "items": _ref("ValidationError")}},
    },
    "ValidationError": {
        "title": "ValidationError",
        "required": ["loc", "msg", "type"],
        "type": "object",
        "properties": {
            "loc": {
                "title": "Location",
                "type": "array",
                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            },
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"},
        },
    },
}


def _json(schema: dict[str, Any], description: str = "Successful Response") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _text(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


VALIDATION_ERROR = {
    "description": "Validation Error: the input breaks the schema (JSON; coglet 0.23.1 also rejects "
    "an explicit null for a nullable input: leave it out), or a field of the envelope has the wrong "
    "type (text/plain)",
    "content": {
        "application/json": {"schema": _ref("HTTPValidationError")},
        "text/plain": {"schema": {"type": "string"}},
    },
}


def _run_operation(kind: str, path_param: str | None, streaming: bool, body_required: bool) -> dict[str, Any]:
    """POST /predictions, PUT /predictions/{prediction_id} and their /trainings twins."""
    noun = kind.lower()
    verb = "predict" if kind == "Prediction" else "train"
    response = _ref(f"{kind}Response")
    ok = _json(response)
    if streaming:
        ok["description"] += " (Server-Sent Events when the request accepts text/event-stream)"
        ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {
        "200": ok,
        "202": _json(response, "Accepted: `Prefer: respond-async`, or a PUT for an id still running"),
        "400": _text("The body is not JSON"),
        "409": _json(response, "Every prediction slot is busy (status failed)"),
        "415": _text("The body is not sent as application/json"),
        "422": VALIDATION_ERROR,
        "503": _json(response, "Setup has not finished (status failed)"),
    }
    if not streaming:
        responses["406"] = _json(
            {}, "The request asks for text/event-stream, which this endpoint does not stream"
        )
    op: dict[str, Any] = {
        "summary": verb.title(),
        "description": f"Run a single {noun} on the model",
        "operationId": f"{verb}_{noun}s_post",
        "parameters": [
            {
                "in": "header",
                "name": "prefer",
                "required": False,
                "schema": {"title": "Prefer", "type": "string"},
            }
        ],
        "requestBody": {
            "content": {"application/json": {"schema": _ref(f"{kind}Request")}},
            "required": body_required,
        },
        "responses": dict(sorted(responses.items())),
    }
    if path_param:
        op["summary"] += " Idempotent"
        op["description"] += " (idempotent creation). An id in the body must match the path's (else 422)."
        op["operationId"] = f"{verb}_idempotent_{noun}s__{path_param}__put"
        op["parameters"].insert(0, _path_param(path_param))
    if streaming:
        op["x-cog-streaming"] = True
    return op


def _path_param(name: str) -> dict[str, Any]:
    title = name.removesuffix("_id").title() + " ID"
    return {"in": "path", "name": name, "required": True, "schema": {"title": title, "type": "string"}}


def _cancel_operation(noun: str, param: str) -> dict[str, Any]:
    return {
        "summary": "Cancel",
        "description": f"Cancel a running {noun}",
        "operationId": f"cancel_{noun}s__{param}__cancel_post",
        "parameters": [_path_param(param)],
        "responses": {
            "200": _json({}),
            "404": _json({}, f"No running {noun} has this id"),
            "422": _json(_ref("HTTPValidationError"), "Validation Error"),
        },
    }


def _paths(schemas: dict[str, Any], streaming: bool) -> dict[str, Any]:
    predict_body = "required" in schemas["PredictionRequest"]
    paths: dict[str, Any] = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": _json({})}}},
        "/health-check": {
            "get": {
                "summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": _json({})},
            }
        },
        "/predictions": {"post": _run_operation("Prediction", None, streaming, predict_body)},
        "/predictions/{prediction_id}": {
            "put": _run_operation("Prediction", "prediction_id", streaming, predict_body)
        },
        "/predictions/{prediction_id}/cancel": {"post": _cancel_operation("prediction", "prediction_id")},
    }
    if "TrainingRequest" in schemas:
        train_body = "required" in schemas["TrainingRequest"]
        paths["/trainings"] = {"post": _run_operation("Training", None, False, train_body)}
        paths["/trainings/{training_id}"] = {
            "put": _run_operation("Training", "training_id", False, train_body)
        }
        paths["/trainings/{training_id}/cancel"] = {"post": _cancel_operation("training", "training_id")}
    paths["/shutdown"] = {
        "post": {
            "summary": "Start Shutdown",
            "operationId": "start_shutdown_shutdown_post",
            "responses": {"200": _json({})},
        }
    }
    return paths


def _info(ref: str) -> Any:
    from cog import _inspector

    module, name = ref.split(":")
    return _inspector.create_predictor(module.removesuffix(".py"), name)


def _streams(root: Path) -> bool:
    """`@streaming` on predict.py's run(), read from the source as the Cog CLI does."""
    import ast

    tree = ast.parse((root / PREDICTOR_REF.split(":")[0]).read_text(encoding="utf-8"))
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name in ("run", "predict")
        and any(getattr(d, "id", getattr(d, "attr", "")) == "streaming" for d in node.decorator_list)
        for node in ast.walk(tree)
    )


def build_schema(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """The OpenAPI document coglet serves as /openapi.json, read from .cog/openapi_schema.json: it
    also validates /predictions against components.schemas.Input, /trainings against
    TrainingInput, and streams over SSE when the predictions path says x-cog-streaming."""
    sys.path.insert(0, str(root))
    try:
        predictor = _info(PREDICTOR_REF)
        trainer = _info(TRAINER_REF) if (root / "train.py").exists() else None
    finally:
        sys.path.remove(str(root))
    inputs, enums = _input_schema(predictor.inputs, "Input")
    schemas: dict[str, Any] = {"Input": inputs, "Output": predictor.output.json_type(), **enums}
    schemas.update(_envelopes("Prediction", "Input", "Output", "required" in inputs))
    schemas.update(COMMON_SCHEMAS)
    if trainer is not None:
        train_inputs, train_enums = _input_schema(trainer.inputs, "TrainingInput")
        schemas["TrainingInput"] = train_inputs
        schemas["TrainingOutput"] = {**trainer.output.json_type(), "title": "TrainingOutput"}
        # Cog names an enum after its input, and its merge keeps the predictor's on a clash, which
        # would validate train.py's prompt_template against predict.py's choices: rename instead.
        for name, enum in train_enums.items():
            key = name if schemas.get(name, enum) == enum else f"training_{name}"
            schemas[key] = {**enum, "title": key}
            train_inputs["properties"][name]["allOf"] = [_ref(key)]
        schemas.update(_envelopes("Training", "TrainingInput", "TrainingOutput", "required" in train_inputs))
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": _paths(schemas, _streams(root)),
        "components": {"schemas": schemas},
    }


def write_schema(root: Path = PROJECT_ROOT) -> Path:
    path = root / SCHEMA_PATH
    path.parent.mkdir(exist_ok=True)
    text = json.dumps(build_schema(root), indent=2) + "\n"
    with staged_file(path) as out:
        out.write(text.encode())
    return path
