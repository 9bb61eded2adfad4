"""Reading a user's dataset file into validated records, and the train/validation split.

Every record is checked and all problems are raised together in one `DatasetError`, each with its
location (`record 17:` in a JSON list, `line 17:` in JSON Lines) and a fix, so a file can be
repaired in one pass instead of one crash at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Shape = Literal["alpaca", "completion", "messages", "text"]
Format = Literal["auto", "json", "jsonl"]

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_RECORD_CHARS = 200_000
DEFAULT_MAX_RECORDS = 1_000_000
MAX_LISTED_PROBLEMS = 20
ROLES = ("system", "user", "assistant")

# Keys that identify each shape. A record takes the shape with the most of its keys present; ties go
# to the earlier entry, so the original Alpaca release (instruction/input/output plus a derived
# "text") reads as Alpaca.
_SHAPE_KEYS: dict[Shape, tuple[str, ...]] = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
_ACCEPTED_SHAPES = (
    '{"instruction", "input" (optional), "output"}, {"prompt", "completion"}, '
    '{"messages": [{"role", "content"}, ...]} or {"text"}'
)
# NUL and lone surrogates survive json.loads (as \u0000 / \ud800 escapes) but are never meant as
# training text, and a lone surrogate makes the tokenizer's UTF-8 encode fail much later.
_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")
_LIST_START = re.compile(r"[ \t\r\n]*\[")  # JSON whitespace, then a list


class DatasetError(ValueError):
    """The dataset cannot be used as is; str(e) lists every problem with its location and fix."""

    def __init__(self, problems: Sequence[str], path: str = "") -> None:
        self.problems = list(problems)
        self.path = path
        super().__init__(_report(self.problems, path))

    def __reduce__(self):  # keep the fields when pickled across processes
        return type(self), (self.problems, self.path)


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Record:
    shape: Shape
    instruction: str = ""
    """Alpaca: the task."""
    input: str = ""
    """Alpaca: optional context for the task."""
    output: str = ""
    """Alpaca: the answer; {prompt, completion}: the completion."""
    prompt: str = ""
    """{prompt, completion}: the raw prompt."""
    messages: tuple[Message, ...] = ()
    text: str = ""
    """{text}: plain text, trained on in full."""
    number: int = 0
    """1-based record number (JSON Lines: the line number), for error messages downstream."""


def read_records(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS,
    max_records: int = DEFAULT_MAX_RECORDS,
) -> list[Record]:
    """Read and validate a .json (list of objects) or .jsonl file; raise DatasetError on any problem."""
    name = os.fspath(path)
    try:
        size = os.path.getsize(name)
        if size > max_bytes:
            raise DatasetError([_too_big(size, max_bytes)], name)
        with open(name, "rb") as f:
            # Read one byte past the cap: the size can change, or lie (pipes, /dev files).
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise DatasetError(["file not found; check the data path"], name) from None
    except IsADirectoryError:
        raise DatasetError(["this is a folder; give the path of a .json or .jsonl file"], name) from None
    except OSError as e:
        raise DatasetError([f"cannot read the file: {e.strerror or e}"], name) from None
    return parse_records(
        data, name, max_bytes=max_bytes, max_record_chars=max_record_chars, max_records=max_records
    )


def parse_records(
    data: bytes,
    name: str = "<data>",
    *,
    fmt: Format = "auto",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS,
    max_records: int = DEFAULT_MAX_RECORDS,
) -> list[Record]:
    """Validate the bytes of a dataset file. `name` is used in messages and, with fmt="auto", its
    extension picks the format: .jsonl/.ndjson is JSON Lines, .json a JSON list (or JSON Lines when
    the content is one object per line), anything else by content (`[` first means a JSON list)."""
    if len(data) > max_bytes:
        raise DatasetError([_too_big(len(data), max_bytes)], name)
    text = _decode(data, name)
    if not text or text.isspace():
        raise DatasetError(["no records: the file is empty"], name)
    if fmt == "auto":
        fmt = _guess_format(text, name)
    if fmt == "json":
        entries = _json_list_entries(text, name, max_records)
    else:
        entries = _jsonl_entries(text, name, max_records)

    records: list[Record] = []
    problems: list[str] = []
    by_shape: dict[Shape, list[str]] = {}
    for number, where, value in entries:
        if isinstance(value, _Unreadable):
            problems.append(f"{where}: {value.problem}")
            continue
        shape, record, found = _check_record(value, number, max_record_chars)
        problems.extend(f"{where}: {p}" for p in found)
        if shape is not None:
            by_shape.setdefault(shape, []).append(where)
        if record is not None:
            records.append(record)
    if len(by_shape) > 1:
        problems.insert(0, _mixed_shapes(by_shape))
    if problems:
        raise DatasetError(problems, name)
    return records


def split_records(records: list[Record], val_set_size: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split into (train, val). val_set_size in [0, 1) is a fraction (at least one record when it is
    above 0 and there are two or more records), >= 1 a record count. The choice is a seeded shuffle,
    so the same seed gives the same split; both parts keep file order (the trainer shuffles)."""
    n = len(records)
    if 0 <= val_set_size < 1:
        n_val = round(n * val_set_size)
        if val_set_size > 0 and n >= 2:
            n_val = max(n_val, 1)
    elif val_set_size >= 1 and float(val_set_size).is_integer():
        n_val = int(val_set_size)
    else:
        raise DatasetError([f"val_set_size={val_set_size}: use a fraction in [0, 1) or a whole count >= 1"])
    if n - n_val < 1:
        raise DatasetError(
            [
                f"val_set_size={val_set_size} puts {n_val} of {n} records in the validation split and"
                " leaves none for training; lower val_set_size (0 turns validation off)"
            ]
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def dataset_fingerprint(data: bytes) -> str:
    """Content hash of the raw file, recorded in the training card."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- reading ---------------------------------------------------------------------------------


def _decode(data: bytes, name: str) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(
            ["the file is UTF-16 (it starts with a UTF-16 byte order mark); re-save it as UTF-8"], name
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DatasetError(
            [
                f"the file is not UTF-8: byte 0x{data[e.start]:02X} at byte offset {e.start} (line {line})"
                " is not valid UTF-8; re-save the file as UTF-8 (from GBK or Latin-1, e.g."
                " `iconv -f GBK -t UTF-8 in.json > out.json`)"
            ],
            name,
        ) from None
    return text.removeprefix("\ufeff")


def _guess_format(text: str, name: str) -> Format:
    suffix = Path(name).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if _LIST_START.match(text):
        return "json"
    if suffix != ".json":
        return "jsonl"
    # A .json file that is really JSON Lines (what `datasets.Dataset.to_json` writes by default)
    # parses one object and then stops at "Extra data".
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return "jsonl" if e.msg == "Extra data" else "json"
    except (ValueError, RecursionError):
        pass
    return "json"


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_list_entries(text: str, name: str, max_records: int) -> list[tuple[int, str, Any]]:
    """A top-level JSON list, decoded one item at a time so the record cap holds before a huge file
    is turned into objects (512 MiB of `{}` is ~13 GB of dicts). Anything but a well-formed list
    goes to json.loads, for its exact message."""
    decoder = json.JSONDecoder()
    pos = _JSON_SPACE.match(text).end()
    if not text.startswith("[", pos):
        return _json_whole(text, name, max_records)
    items: list[Any] = []
    pos = _JSON_SPACE.match(text, pos + 1).end()
    closed = text.startswith("]", pos)
    pos += closed
    while not closed:
        try:
            item, pos = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return _json_whole(text, name, max_records)
        items.append(item)
        if len(items) > max_records:
            raise DatasetError([_too_many(max_records)], name)
        pos = _JSON_SPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _JSON_SPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            pos, closed = pos + 1, True
        else:
            return _json_whole(text, name, max_records)
    if _JSON_SPACE.match(text, pos).end() != len(text):
        return _json_whole(text, name, max_records)  # data after the list
    if not items:
        raise DatasetError(["no records: the list is empty; add at least one record"], name)
    return [(i, f"record {i}", item) for i, item in enumerate(items, 1)]


def _json_whole(text: str, name: str, max_records: int) -> list[tuple[int, str, Any]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(
            [f"line {e.lineno}, column {e.colno}: invalid JSON: {_json_hint(e, 'a missing or extra comma')}"],
            name,
        ) from None
    except (ValueError, RecursionError) as e:
        raise DatasetError([_unreadable(e)], name) from None
    if not isinstance(value, list):
        raise DatasetError([_top_level_problem(value)], name)
    if not value:
        raise DatasetError(["no records: the list is empty; add at least one record"], name)
    if len(value) > max_records:
        raise DatasetError([_too_many(max_records)], name)
    return [(i, f"record {i}", item) for i, item in enumerate(value, 1)]


@dataclass(frozen=True)
class _Unreadable:
    """A JSON Lines line that is not JSON; kept in place so problems are listed in line order."""

    problem: str


def _jsonl_entries(text: str, name: str, max_records: int) -> list[tuple[int, str, Any]]:
    # Split on "\n" only: str.splitlines would also split on U+2028, U+0085 and others that JSON
    # allows raw inside strings. A trailing "\r" (CRLF files) is JSON whitespace.
    lines = []
    for i, line in _numbered_lines(text):
        if line and not line.isspace():
            lines.append((i, line))
            if len(lines) > max_records:  # before the rest is split into strings
                raise DatasetError([_too_many(max_records)], name)
    if not lines:
        raise DatasetError(["no records: the file has only blank lines"], name)
    entries: list[tuple[int, str, Any]] = []
    for i, line in lines:
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            hint = _json_hint(e, "one complete object per line")
            value = _Unreadable(f"invalid JSON at column {e.colno}: {hint}")
        except (ValueError, RecursionError) as e:
            value = _Unreadable(_unreadable(e))
        entries.append((i, f"line {i}", value))
    return entries


def _numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    start, number = 0, 0
    while start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        number += 1
        yield number, text[start:end]
        start = end + 1


def _json_hint(e: json.JSONDecodeError, usual: str) -> str:
    if e.msg.startswith("Invalid control character"):
        return (
            "a raw control character (tab, line break or NUL byte) inside a string;"
            r" write it as \t or \n, or remove it"
        )
    return f"{e.msg} (check for {usual}, or an unescaped quote)"


def _unreadable(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "the JSON is nested too deeply to read; records must be flat objects of strings"
    # json.loads raises a plain ValueError for integers over Python's digit limit.
    return "a number is too long to read; put it in quotes as a string"


# --- validating ------------------------------------------------------------------------------


def _check_record(value: Any, number: int, max_chars: int) -> tuple[Shape | None, Record | None, list[str]]:
    """The record's shape (None when it has none), the Record when valid, and its problems."""
    if not isinstance(value, dict):
        return None, None, [f"expected a JSON object, got {_type_name(value)}"]
    shape = _shape_of(value)
    if shape is None:
        keys = ", ".join(_quote(k) for k in list(value)[:10]) + (", ..." if len(value) > 10 else "")
        return (
            None,
            None,
            [f"unknown shape with keys {keys or '(none)'}; accepted shapes: {_ACCEPTED_SHAPES}"],
        )
    problems: list[str] = []
    if shape == "alpaca":
        need = 'Alpaca records need "instruction" and "output" strings'
        record = Record(
            shape,
            instruction=_string(value, "instruction", need, problems),
            input=_string(value, "input", None, problems),
            output=_string(value, "output", need, problems),
            number=number,
        )
        chars = len(record.instruction) + len(record.input) + len(record.output)
    elif shape == "completion":
        need = 'prompt/completion records need "prompt" and "completion" strings'
        record = Record(
            shape,
            prompt=_string(value, "prompt", need, problems),
            output=_string(value, "completion", need, problems),
            number=number,
        )
        chars = len(record.prompt) + len(record.output)
    elif shape == "messages":
        record = Record(shape, messages=_messages(value["messages"], problems), number=number)
        chars = sum(len(m.content) for m in record.messages)
    else:
        record = Record(shape, text=_text(value["text"], '"text"', problems), number=number)
        chars = len(record.text)
    if chars > max_chars:
        problems.append(
            f"{chars:,} characters, over the limit of {max_chars:,} per record;"
            " shorten or split the record (or raise max_record_chars)"
        )
    return shape, (None if problems else record), problems


def _shape_of(value: dict) -> Shape | None:
    best, best_count = None, 0
    for shape, keys in _SHAPE_KEYS.items():
        count = sum(k in value for k in keys)
        if count > best_count:
            best, best_count = shape, count
    return best


def _string(value: dict, key: str, need: str | None, problems: list[str]) -> str:
    """value[key] checked as text. `need` explains a missing key; None makes the key optional
    (missing or null reads as "", empty is fine)."""
    if need is None and value.get(key) is None:
        return ""
    if key not in value:
        problems.append(f'missing "{key}" ({need})')
        return ""
    return _text(value[key], f'"{key}"', problems, required=need is not None)


def _text(value: Any, label: str, problems: list[str], *, required: bool = True) -> str:
    if not isinstance(value, str):
        problems.append(f"{label} must be a string, got {_type_name(value)}")
        return ""
    if required and not value.strip():
        problems.append(f"{label} is empty; fill it in or remove the record")
    if bad := _BAD_CHAR.search(value):
        what = "a NUL character" if bad.group() == "\x00" else "a lone surrogate (a broken \\u escape)"
        problems.append(f"{label} contains {what} at character {bad.start() + 1}; remove it")
    return value


def _messages(value: Any, problems: list[str]) -> tuple[Message, ...]:
    if not isinstance(value, list):
        problems.append(
            f'"messages" must be a list of {{"role", "content"}} objects, got {_type_name(value)}'
        )
        return ()
    if not value:
        problems.append('"messages" is empty; add the conversation as {"role", "content"} objects')
        return ()
    out = []
    for i, item in enumerate(value):
        label = f"messages[{i}]"
        if not isinstance(item, dict):
            problems.append(f'{label} must be an object with "role" and "content", got {_type_name(item)}')
            continue
        for key in ("role", "content"):
            if key not in item:
                problems.append(f'{label}: missing "{key}"')
        role = item.get("role")
        if "role" in item and not isinstance(role, str):
            problems.append(f"{label}.role must be a string, got {_type_name(role)}")
        elif "role" in item and role not in ROLES:
            problems.append(f'{label}.role is {_quote(role)}; use "system", "user" or "assistant"')
        elif role == "system" and i > 0:
            problems.append(f"{label} is a system message; only the first message may be one")
        content = _text(item["content"], f"{label}.content", problems) if "content" in item else ""
        out.append(Message(role if isinstance(role, str) else "", content))
    if not any(m.role == "assistant" for m in out):
        problems.append('"messages" has no "assistant" message; add the reply the model should learn')
    elif out[-1].role in ("system", "user"):
        problems.append(
            f'the last message is from "{out[-1].role}"; end with an "assistant" message'
            " (the model learns the assistant turns)"
        )
    return tuple(out)


# --- reporting -------------------------------------------------------------------------------


def _report(problems: list[str], path: str) -> str:
    count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
    lines = [f"{path or 'dataset'}: {count}:"]
    lines += [f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)


def _mixed_shapes(by_shape: dict[Shape, list[str]]) -> str:
    parts = []
    for shape, wheres in by_shape.items():
        first = ", ".join(wheres[:3]) + (", ..." if len(wheres) > 3 else "")
        parts.append(f"{len(wheres)} {shape} ({first})")
    return "the file mixes record shapes: " + "; ".join(parts) + "; use one shape for the whole file"


def _top_level_problem(value: Any) -> str:
    problem = f"the top level is {_type_name(value, article=True)}, expected a list of records"
    if not isinstance(value, dict):
        return problem + " such as [{...}, {...}]"
    lists = [k for k, v in value.items() if isinstance(v, list)]
    if _shape_of(value) is not None:
        return problem + "; this looks like a single record: wrap it in [ ] or use JSON Lines (.jsonl)"
    if len(lists) == 1:
        return (
            problem + f"; the records seem to be under {_quote(lists[0])}: save that list as the whole file"
        )
    return problem + "; save the records as [{...}, {...}] or as JSON Lines (.jsonl, one object per line)"


def _too_big(size: int, max_bytes: int) -> str:
    return (
        f"the file is {_size(size)}, over the limit of {_size(max_bytes)};"
        " split it into smaller files (or raise max_bytes)"
    )


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _too_many(max_records: int) -> str:
    return f"more than {max_records:,} records, the limit; use fewer records (or raise max_records)"


_JSON_TYPES = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}


def _type_name(value: Any, article: bool = False) -> str:
    name = "null" if value is None else _JSON_TYPES[type(value)]
    if not article or name == "null":
        return name
    return ("an " if name[0] in "ao" else "a ") + name


def _quote(s: str, limit: int = 40) -> str:
    """A user string for a message: quoted, shortened, printable even with NUL or lone surrogates."""
    s = s if len(s) <= limit else s[:limit] + "…"
    return _BAD_CHAR.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(s, ensure_ascii=False))
