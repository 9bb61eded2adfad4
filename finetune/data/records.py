"""What a training record is, how one is checked, and the train/validation split.

A record takes one of four shapes (Alpaca, prompt/completion, messages, text). Each is checked in
full and every problem is collected with its fix, so that `DatasetError` can list all of a file's
problems together, each with its location (`record 17:` in a JSON list, `line 17:` in JSON
Lines), and a file can be repaired in one pass instead of one crash at a time. Reading the file
those records come from is `dataset_file`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UserError

Shape = Literal["alpaca", "completion", "messages", "text"]

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


class DatasetError(UserError, ValueError):
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


# --- validating ------------------------------------------------------------------------------


def check_record(value: Any, number: int, max_chars: int) -> tuple[Shape | None, Record | None, list[str]]:
    """The record's shape (None when it has none), the Record when valid, and its problems."""
    if not isinstance(value, dict):
        return None, None, [f"expected a JSON object, got {type_name(value)}"]
    shape = shape_of(value)
    if shape is None:
        keys = ", ".join(quote(k) for k in list(value)[:10]) + (", ..." if len(value) > 10 else "")
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


def shape_of(value: dict) -> Shape | None:
    """The shape whose identifying keys the object holds most of; None when it holds none."""
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
        problems.append(f"{label} must be a string, got {type_name(value)}")
        return ""
    if required and not value.strip():
        problems.append(f"{label} is empty; fill it in or remove the record")
    if bad := _BAD_CHAR.search(value):
        what = "a NUL character" if bad.group() == "\x00" else "a lone surrogate (a broken \\u escape)"
        problems.append(f"{label} contains {what} at character {bad.start() + 1}; remove it")
    return value


def _messages(value: Any, problems: list[str]) -> tuple[Message, ...]:
    if not isinstance(value, list):
        problems.append(f'"messages" must be a list of {{"role", "content"}} objects, got {type_name(value)}')
        return ()
    if not value:
        problems.append('"messages" is empty; add the conversation as {"role", "content"} objects')
        return ()
    out = []
    for i, item in enumerate(value):
        label = f"messages[{i}]"
        if not isinstance(item, dict):
            problems.append(f'{label} must be an object with "role" and "content", got {type_name(item)}')
            continue
        for key in ("role", "content"):
            if key not in item:
                problems.append(f'{label}: missing "{key}"')
        role = item.get("role")
        if "role" in item and not isinstance(role, str):
            problems.append(f"{label}.role must be a string, got {type_name(role)}")
        elif "role" in item and role not in ROLES:
            problems.append(f'{label}.role is {quote(role)}; use "system", "user" or "assistant"')
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


_JSON_TYPES = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}


def type_name(value: Any, article: bool = False) -> str:
    """A decoded JSON value's type as JSON names it ("object", "null"), optionally with "a"/"an"."""
    name = "null" if value is None else _JSON_TYPES[type(value)]
    if not article or name == "null":
        return name
    return ("an " if name[0] in "ao" else "a ") + name


def quote(s: str, limit: int = 40) -> str:
    """A user string for a message: quoted, shortened, printable even with NUL or lone surrogates."""
    s = s if len(s) <= limit else s[:limit] + "…"
    return _BAD_CHAR.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(s, ensure_ascii=False))
