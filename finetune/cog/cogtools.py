"""Running the real Cog server (coglet) without Docker: the OpenAPI schema that `cog build` would
write, the server process with the right environment, and a small client that mirrors
`cog predict -i name=value` / `cog train -i name=@file` against it."""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import PROJECT_ROOT
from ..staging import staged_file
from ..training import allocator

SCHEMA_PATH = Path(".cog") / "openapi_schema.json"
PREDICTOR_REF = "predict.py:Predictor"
TRAINER_REF = "train.py:train"


# -- schema ------------------------------------------------------------------------------------
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


# -- server ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predictor_concurrency(root: Path = PROJECT_ROOT) -> int:
    """`@concurrent(max=N)` on predict.py's run(): the Cog CLI bakes it into the image as
    COG_MAX_CONCURRENCY, so the local server sets the same (read from the source, as the CLI does,
    without importing predict.py and its torch stack)."""
    import ast

    tree = ast.parse((root / PREDICTOR_REF.split(":")[0]).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in ("run", "predict"):
            for deco in node.decorator_list:
                if (
                    isinstance(deco, ast.Call)
                    and getattr(deco.func, "id", getattr(deco.func, "attr", "")) == "concurrent"
                ):
                    for kw in deco.keywords:
                        if kw.arg == "max" and isinstance(kw.value, ast.Constant):
                            return int(kw.value.value)
    return 1


def server_env(
    mode: str, port: int, weights: str | None = None, extra: dict[str, str] | None = None
) -> dict[str, str]:
    env = dict(os.environ)
    if mode == "predict":
        env.setdefault("COG_MAX_CONCURRENCY", str(predictor_concurrency()))
    # coglet starts its worker as a bare `python`: the interpreter running us must come first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PORT"] = str(port)
    env["COG_PREDICT_TYPE_STUB"] = PREDICTOR_REF
    env["COG_TRAIN_TYPE_STUB"] = TRAINER_REF
    env["PYTHONUNBUFFERED"] = "1"
    if weights:
        env["COG_WEIGHTS"] = weights
    else:
        env.pop("COG_WEIGHTS", None)
    env.update(extra or {})
    if mode == "train":  # the trainer worker inherits it: see allocator.py
        env = allocator.with_jemalloc(env)
    return env


def server_command(mode: str) -> list[str]:
    cmd = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"]
    if mode == "train":
        cmd += ["--x-mode", "train"]
    return cmd


class CogServer:
    """A coglet process on 127.0.0.1 serving predict.py or train.py from the project root."""

    def __init__(
        self,
        mode: str = "predict",
        port: int | None = None,
        weights: str | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        root: Path = PROJECT_ROOT,
    ):
        self.mode, self.root = mode, root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = server_env(mode, self.port, weights, env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300) -> CogServer:
        write_schema(self.root)
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            server_command(self.mode),
            cwd=self.root,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(timeout)
        return self

    def health(self) -> dict[str, Any]:
        import requests

        return requests.get(f"{self.url}/health-check", timeout=5).json()

    def wait_ready(self, timeout: float) -> None:
        import requests

        deadline = time.monotonic() + timeout
        status = "not started"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"Cog server exited with code {self.proc.returncode}; {self._log_hint()}")
            try:
                status = self.health().get("status", "?")
            except requests.RequestException:
                status = "not listening"
            if status == "READY":
                return
            if status in {"SETUP_FAILED", "DEFUNCT"}:
                raise RuntimeError(f"Cog server setup failed ({status}); {self._log_hint()}")
            time.sleep(0.25)
        raise TimeoutError(
            f"Cog server not READY after {timeout:.0f}s (last status {status}); {self._log_hint()}"
        )

    def _log_hint(self) -> str:
        if self.log_path and Path(self.log_path).exists():
            tail = Path(self.log_path).read_text(errors="replace")[-3000:]
            return f"server log {self.log_path}:\n{tail}"
        return "run with a log path to see the server output"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> CogServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- client ------------------------------------------------------------------------------------
def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def parse_inputs(pairs: list[str]) -> dict[str, Any]:
    """`-i name=value` (JSON numbers/booleans/null are decoded) and `-i name=@file` (sent as a data URI)."""
    inputs: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"error: -i expects name=value or name=@file, got {pair!r}")
        if value.startswith("@"):
            path = Path(value[1:])
            if not path.is_file():
                raise SystemExit(f"error: -i {name}: file {path} does not exist")
            inputs[name] = data_uri(path)
            continue
        try:
            decoded = json.loads(value)
            inputs[name] = decoded if isinstance(decoded, int | float | bool) or decoded is None else value
        except json.JSONDecodeError:
            inputs[name] = value
    return inputs


def output_text(output: Any) -> str:
    return "".join(output) if isinstance(output, list) else str(output)


def save_data_uri(uri: str, dest: Path) -> Path:
    header, _, payload = uri.partition(",")
    with staged_file(dest) as out:
        out.write(base64.b64decode(payload) if ";base64" in header else payload.encode())
    return dest


@contextmanager
def _server(mode: str, port: int, weights: str | None) -> Iterator[CogServer]:
    log = PROJECT_ROOT / "outputs" / f"cog-{mode}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server = CogServer(mode, port=port, weights=weights, log_path=log)
    print(f"starting the Cog server ({mode}) on {server.url}; log: {log}", file=sys.stderr)
    try:
        yield server.start()
    finally:
        server.stop()


def post_with_retry(url: str, body: dict[str, Any], timeout: float, busy_wait: float = 30) -> Any:
    """POST, retrying while the server answers 409: coglet 0.23.1 can send a response a moment
    before it frees its only slot, so a client's very next request may find it "busy"."""
    import requests

    deadline = time.monotonic() + busy_wait
    while True:
        resp = requests.post(url, json=body, timeout=timeout)
        if resp.status_code != 409 or time.monotonic() > deadline:
            return resp
        time.sleep(0.2)


def post_sse(url: str, inputs: dict[str, Any], timeout: float = 300) -> Any:
    """POST /predictions asking for Server-Sent Events; the caller checks the status (409: busy)."""
    import requests

    resp = requests.post(
        f"{url}/predictions",
        json={"input": inputs},
        timeout=timeout,
        stream=True,
        headers={"Accept": "text/event-stream"},
    )
    resp.encoding = "utf-8"  # SSE is UTF-8 by definition; requests would guess latin-1
    return resp


def iter_sse(resp: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, decoded data) for each event of a prediction's SSE stream, as it arrives."""
    name = None
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and name:
            yield name, json.loads(line.split(":", 1)[1])


def _post(url: str, inputs: dict[str, Any], timeout: float) -> dict[str, Any]:

    resp = post_with_retry(url, {"input": inputs}, timeout)
    if resp.status_code == 422:
        details = resp.json().get("detail", [])
        lines = [f"  {'.'.join(str(p) for p in d.get('loc', [])[2:])}: {d.get('msg')}" for d in details]
        raise SystemExit("error: invalid input\n" + "\n".join(lines))
    resp.raise_for_status()
    return resp.json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.cog.cogtools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("schema", help="write .cog/openapi_schema.json from predict.py and train.py")
    serve = sub.add_parser("serve", help="run the Cog server in the foreground")
    serve.add_argument("--mode", choices=["predict", "train"], default="predict")
    serve.add_argument("--port", type=int, default=5000)
    for name in ("predict", "train"):
        p = sub.add_parser(name, help=f"start a server, POST /{name}ions or /trainings, print, stop")
        p.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE")
        p.add_argument("--port", type=int, default=5000)
        p.add_argument("--timeout", type=float, default=3600)
        if name == "predict":
            p.add_argument("--weights", help="adapter (folder, archive, URL) to serve, like COG_WEIGHTS")
        else:
            p.add_argument("--output_dir", default="outputs/trainings")
    args = parser.parse_args(argv)

    if args.command == "schema":
        print(write_schema())
        return 0
    if args.command == "serve":
        write_schema()
        env = server_env(args.mode, args.port, os.environ.get("COG_WEIGHTS"))
        os.chdir(PROJECT_ROOT)
        os.execvpe(sys.executable, server_command(args.mode), env)
    inputs = parse_inputs(args.input)
    if args.command == "predict":
        with _server("predict", args.port, args.weights) as server:
            result = _post(f"{server.url}/predictions", inputs, args.timeout)
    else:
        with _server("train", args.port, None) as server:
            result = _post(f"{server.url}/trainings", inputs, args.timeout)
    if result.get("status") != "succeeded":
        print(f"error: {result.get('status')}: {result.get('error')}", file=sys.stderr)
        return 1
    if args.command == "predict":
        print(output_text(result["output"]))
        return 0
    output = result["output"]
    dest = Path(args.output_dir) / f"{result.get('id', 'training')}.tar"
    save_data_uri(output["weights"], dest)
    summary = {k: v for k, v in output.items() if k != "weights"}
    print(json.dumps(summary, indent=2))
    print(f"weights: {dest}\nrun the trained version: make predict WEIGHTS={dest} PROMPT='...'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
