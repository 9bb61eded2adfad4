"""Running the real Cog server (coglet) without Docker: the server process with the right
environment, and a small client that mirrors `cog predict -i name=value` / `cog train -i name=@file`
against it (`python -m finetune.cog.cogtools`, which `make predict|train|serve|schema` run). The
OpenAPI schema the server needs, which `cog build` would write, is built in schema.py."""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import re
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
from .schema import PREDICTOR_REF, TRAINER_REF, write_schema


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


# -- what a start cost -------------------------------------------------------------------------
# `make predict` starts a server for one answer: it says how long that took and whether the decode
# step was compiled this time (a first start) or loaded from the cache, read from what the server
# already logs (the engine's "compile:" lines, the predictor's "setup:" line).
DECODE_READY = re.compile(r"compile: decode step ready in ([0-9.]+) s")


def log_messages(text: str) -> list[str]:
    """The messages of a coglet log: coglet writes one JSON object a line, the worker's stderr lines
    among them as fields.message; a line that is not such an object is taken as it is."""
    messages = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        message = record.get("fields", {}).get("message") if isinstance(record, dict) else None
        messages.append(message if isinstance(message, str) else line)
    return messages


def setup_summary(messages: list[str], seconds: float) -> str:
    """One line: the server's time to ready, and what its decode step cost on this start."""
    line = f"server ready in {seconds:.1f} s"
    ready = next((m for m in map(DECODE_READY.match, messages) if m), None)
    eager = next((m for m in messages if m.startswith("compile: decoding eagerly: ")), None)
    if ready and any(m.startswith("compile: building") for m in messages):
        line += f"; the decode step was compiled on this start in {ready[1]} s"
        if any(m.startswith("compile cache: not using") for m in messages):
            return line + ", in a temporary folder: later starts compile it again (see the log)"
        return line + "; later starts load it from the cache"
    if ready:
        return line + f"; the decode step was loaded from the cache in {ready[1]} s (compiled before)"
    if eager:
        return line + "; " + eager.removeprefix("compile: ")
    if any(m.startswith("compile: decode steps run as CUDA graphs") for m in messages):
        return line + "; decode steps run as CUDA graphs"
    return line


def server_messages(server: CogServer, wait: float = 2.0) -> list[str]:
    """The messages of the server's log so far; a predictor's, once its "setup:" line is in (coglet
    writes it just before it answers READY)."""
    deadline = time.monotonic() + (wait if server.mode == "predict" else 0)
    while True:
        text = Path(server.log_path).read_text(errors="replace") if server.log_path else ""
        messages = log_messages(text)
        if any(m.startswith("setup: base") for m in messages) or time.monotonic() >= deadline:
            return messages
        time.sleep(0.1)


@contextmanager
def _server(mode: str, port: int, weights: str | None) -> Iterator[CogServer]:
    log = PROJECT_ROOT / "outputs" / f"cog-{mode}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server = CogServer(mode, port=port, weights=weights, log_path=log)
    print(f"starting the Cog server ({mode}) on {server.url}; log: {log}", file=sys.stderr)
    started = time.monotonic()
    try:
        server.start()
        print(setup_summary(server_messages(server), time.monotonic() - started), file=sys.stderr, flush=True)
        yield server
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
