"""Reading a user's dataset file, a .json list or JSON Lines, into checked records.

The file is read within caps on its bytes, its records and each record's JSON text, and never
decoded whole: a JSON list is scanned one value at a time from windows of the file, so memory
stays near the file's size however the JSON would expand as Python objects. Encoding, JSON syntax
and size problems are reported with their line (and column), in the same `DatasetError` as the
records' own problems (`records.check_record`), all together.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .records import DatasetError, Record, Shape, check_record, quote, shape_of, type_name

Format = Literal["auto", "json", "jsonl"]

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_RECORD_CHARS = 200_000
DEFAULT_MAX_RECORDS = 1_000_000
# A record's JSON text, unknown keys included, is held to this before it is decoded: `{}` costs ~3
# bytes in the file and ~70 as a dict. 10 bytes for each character the record may hold leaves room
# for \uXXXX escapes and the keys.
DEFAULT_MAX_RECORD_BYTES = 2 * 1024 * 1024


def read_records(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS,
    max_records: int = DEFAULT_MAX_RECORDS,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> list[Record]:
    """Read and validate a .json (list of objects) or .jsonl file; raise DatasetError on any problem."""
    name = os.fspath(path)
    try:
        size = os.path.getsize(name)
        if size > max_bytes:
            raise DatasetError([_too_big(size, max_bytes)], name)
        with open(name, "rb") as f:
            # Read one byte past the size, and on to one past the cap if there is more: the size can
            # change, or lie (pipes, /dev files). A buffer the size of the cap is never set aside.
            data = f.read(size + 1)
            if len(data) > size:
                data += f.read(max_bytes + 1 - len(data))
    except FileNotFoundError:
        raise DatasetError(["file not found; check the data path"], name) from None
    except IsADirectoryError:
        raise DatasetError(["this is a folder; give the path of a .json or .jsonl file"], name) from None
    except OSError as e:
        raise DatasetError([f"cannot read the file: {e.strerror or e}"], name) from None
    return parse_records(
        data,
        name,
        max_bytes=max_bytes,
        max_record_chars=max_record_chars,
        max_records=max_records,
        max_record_bytes=max_record_bytes,
    )


def parse_records(
    data: bytes,
    name: str = "<data>",
    *,
    fmt: Format = "auto",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS,
    max_records: int = DEFAULT_MAX_RECORDS,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> list[Record]:
    """Validate the bytes of a dataset file. `name` is used in messages and, with fmt="auto", its
    extension picks the format: .jsonl/.ndjson is JSON Lines, .json a JSON list (or JSON Lines when
    the content is one object per line), anything else by content (`[` first means a JSON list).

    Memory stays near the size of `data`: the file is never decoded whole, and each record's JSON
    text is held to `max_record_bytes` before it becomes Python objects (where `{}` costs ~20x its
    bytes), then dropped once checked."""
    if len(data) > max_bytes:
        raise DatasetError([_too_big(len(data), max_bytes)], name)
    start = _check_encoding(data, name)
    if _BLANK.fullmatch(data, start):
        raise DatasetError(["no records: the file is empty"], name)
    cap = max(max_record_bytes, 1)
    if fmt == "auto":
        fmt = _guess_format(data, start, name, cap)
    if fmt == "json":
        entries = _json_list_entries(data, start, name, max_records, cap)
    else:
        entries = _jsonl_entries(data, start, name, max_records, cap)

    records: list[Record] = []
    problems: list[str] = []
    by_shape: dict[Shape, list[str]] = {}
    for number, where, value in entries:
        if isinstance(value, _Unreadable):
            problems.append(f"{where}: {value.problem}")
            continue
        shape, record, found = check_record(value, number, max_record_chars)
        value = None  # let the decoded record go before the next one is decoded
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


# --- reading ---------------------------------------------------------------------------------

_CHUNK = 1 << 20  # bytes checked or counted at a time, so no pass copies the whole file
_NOT_CONTINUATION = bytes(b for b in range(256) if not 0x80 <= b < 0xC0)
# Whitespace str.isspace() counts among ASCII: a file or line of only these is blank.
_BLANK = re.compile(rb"[ \t\n\r\x0b\x0c\x1c-\x1f]*")
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_SPACE_BYTES = re.compile(rb"[ \t\n\r]*")


def _check_encoding(data: bytes, name: str) -> int:
    """Raise DatasetError unless `data` is UTF-8; return where the JSON starts (after a BOM). The
    check goes a chunk at a time: the text of the whole file would be up to 4x its bytes."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(
            ["the file is UTF-16 (it starts with a UTF-16 byte order mark); re-save it as UTF-8"], name
        )
    if not data.isascii():
        view, pos = memoryview(data), 0
        while pos < len(data):
            try:
                _, used = codecs.utf_8_decode(view[pos : pos + _CHUNK], "strict", pos + _CHUNK >= len(data))
            except UnicodeDecodeError as e:
                bad = pos + e.start
                line = data.count(b"\n", 0, bad) + 1
                raise DatasetError(
                    [
                        f"the file is not UTF-8: byte 0x{data[bad]:02X} at byte offset {bad} (line {line})"
                        " is not valid UTF-8; re-save the file as UTF-8 (from GBK or Latin-1, e.g."
                        " `iconv -f GBK -t UTF-8 in.json > out.json`)"
                    ],
                    name,
                ) from None
            pos += used
    return len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0


class _TooLong(Exception):
    """A JSON value runs past the per-record byte cap; it was not decoded whole."""


class _BadJSON(Exception):
    def __init__(self, msg: str, offset: int) -> None:
        super().__init__(msg)
        self.msg, self.offset = msg, offset


class _Unparsable(Exception):
    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


# A value cut by the end of a window fails within this many characters of it (`tru`, `-Infinit`,
# a half `\uXXXX` pair) or as an unterminated string.
_NEAR_END = 16


class _Scanner:
    """JSON values read one at a time from UTF-8 bytes, each decoded from a window of the file that
    reaches at least `cap` bytes past the value's start but not much more, so one value costs at
    most ~2 * cap bytes of text and what it decodes to; one that does not end within `cap` bytes
    raises _TooLong. json.raw_decode has no end position, hence the windows."""

    def __init__(self, data: bytes, offset: int, cap: int) -> None:
        self.data, self.cap = data, cap
        self._margin = cap + 4 * _NEAR_END + 1  # bytes a value needs in its window before decoding
        self._decoder = json.JSONDecoder()
        self._load(offset)

    def _load(self, offset: int) -> None:
        data = self.data
        end = min(len(data), offset + 2 * self._margin)
        while end < len(data) and data[end] & 0xC0 == 0x80:  # not inside a UTF-8 character
            end -= 1
        self.text = str(memoryview(data)[offset:end], "utf-8")
        self._ascii = self.text.isascii()
        self.pos, self.offset, self.end = 0, offset, end  # self.offset: pos, in file bytes

    @property
    def _cut(self) -> bool:
        return self.end < len(self.data)

    def _bytes(self, start: int, end: int) -> int:
        return end - start if self._ascii else len(self.text[start:end].encode())

    def peek(self) -> str:
        """The next character after whitespace, "" at the end of the file."""
        while True:
            end = _JSON_SPACE.match(self.text, self.pos).end()
            self.offset += end - self.pos  # JSON whitespace is ASCII
            self.pos = end
            if end < len(self.text) or not self._cut:
                return self.text[end : end + 1]
            self._load(self.offset)

    def skip(self) -> None:
        """Step over the (ASCII) character peek() returned."""
        self.pos += 1
        self.offset += 1

    def error(self, msg: str) -> _BadJSON:
        return _BadJSON(msg, self.offset)

    def value(self) -> Any:
        self.peek()
        if self._cut and self.end - self.offset < self._margin:
            self._load(self.offset)
        try:
            value, end = self._decoder.raw_decode(self.text, self.pos)
        except json.JSONDecodeError as e:
            if self._cut and (e.msg.startswith("Unterminated string") or e.pos >= len(self.text) - _NEAR_END):
                raise _TooLong from None  # cut by the window, which reaches past the cap
            raise _BadJSON(e.msg, self.offset + self._bytes(self.pos, e.pos)) from None
        except (ValueError, RecursionError) as e:
            raise _Unparsable(_unreadable(e)) from None
        size = self._bytes(self.pos, end)
        if size > self.cap or (self._cut and end == len(self.text)):  # a number may go on
            raise _TooLong
        self.pos = end
        self.offset += size
        return value

    def at_end(self) -> None:
        if self.peek():
            raise self.error("Extra data")


def _guess_format(data: bytes, start: int, name: str, cap: int) -> Format:
    suffix = Path(name).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    begin = _JSON_SPACE_BYTES.match(data, start).end()
    if data.startswith(b"[", begin):
        return "json"
    if suffix != ".json":
        return "jsonl"
    # A .json file that is really JSON Lines (what `datasets.Dataset.to_json` writes by default):
    # one value, then more. Past the cap, only the first line is decoded: the value must end on it.
    if len(data) - begin > cap:
        end = data.find(b"\n", begin)
        end = len(data) if end < 0 else end
        if end - begin > cap:
            return "json"
        line = data[begin:end].decode()
        try:
            _, after = json.JSONDecoder().raw_decode(line)
        except (ValueError, RecursionError):
            return "json"
        more = _JSON_SPACE.match(line, after).end() < len(line) or not _BLANK.fullmatch(data, end)
        return "jsonl" if more else "json"
    scan = _Scanner(data, begin, cap)
    try:
        scan.value()
    except (_TooLong, _BadJSON, _Unparsable):
        return "json"
    return "jsonl" if scan.peek() else "json"


def _json_list_entries(
    data: bytes, start: int, name: str, max_records: int, cap: int
) -> Iterator[tuple[int, str, Any]]:
    """A top-level JSON list, decoded one item at a time so the caps hold before a huge file is
    turned into objects (512 MiB of `{}` is ~13 GB of dicts)."""
    scan = _Scanner(data, start, cap)
    try:
        if scan.peek() != "[":
            raise DatasetError([_top_level_problem(_top_level(scan, max_records))], name)
        scan.skip()
        if scan.peek() == "]":
            scan.skip()
            scan.at_end()
            raise DatasetError(["no records: the list is empty; add at least one record"], name)
        number = 0
        while True:
            number += 1
            try:
                value = scan.value()
            except _TooLong:
                # Its end is unknown without reading it through, so the records after it are not read.
                line = data.count(b"\n", start, scan.offset) + 1
                yield number, f"record {number}", _Unreadable(_too_long_record(cap, line))
                return
            if number > max_records:
                raise DatasetError([_too_many(max_records)], name)
            yield number, f"record {number}", value
            value = None
            if scan.peek() == ",":
                scan.skip()
            elif scan.peek() == "]":
                scan.skip()
                break
            else:
                raise scan.error("Expecting ',' delimiter")
        scan.at_end()
    except _BadJSON as e:
        line, column = _line_column(data, start, e.offset)
        hint = _json_hint(e.msg, "a missing or extra comma")
        raise DatasetError([f"line {line}, column {column}: invalid JSON: {hint}"], name) from None
    except _Unparsable as e:
        raise DatasetError([e.problem], name) from None


def _top_level(scan: _Scanner, max_items: int) -> Any:
    """What the file holds instead of a list, for _top_level_problem: the value itself when it is
    within the cap, else one that stands for it (an object by its keys, so a 500 MB
    `{"data": [...]}` is read an item at a time, as the list would be)."""
    first = scan.peek()
    if first == "{" and len(scan.data) - scan.offset > scan.cap:
        return _object_outline(scan, max_items)
    try:
        value = scan.value()
    except _TooLong:
        return "" if first == '"' else 0  # a long string, or a long number
    scan.at_end()
    return value


def _object_outline(scan: _Scanner, max_items: int) -> dict[str, list | None]:
    """A top-level object's keys, each with [] for a list value and None for anything else. Values
    are decoded one at a time (a list's items one at a time) and dropped. The file is refused
    either way, so reading stops once the hint is known (a record's key, or a second list), or at
    a key or value over the cap, or a list of more than `max_items`: the keys so far give it."""
    outline: dict[str, list | None] = {}
    scan.skip()
    if scan.peek() == "}":
        scan.skip()
        scan.at_end()
        return outline
    while True:
        if scan.peek() != '"':
            raise scan.error("Expecting property name enclosed in double quotes")
        try:
            key = scan.value()
        except _TooLong:
            return outline
        if scan.peek() != ":":
            raise scan.error("Expecting ':' delimiter")
        scan.skip()
        is_list = scan.peek() == "["
        outline[key] = [] if is_list else None
        if shape_of(outline) is not None or (is_list and sum(v is not None for v in outline.values()) > 1):
            return outline
        try:
            if is_list:
                _skim_list(scan, max_items)
            else:
                scan.value()
        except _TooLong:
            return outline
        if scan.peek() == ",":
            scan.skip()
        elif scan.peek() == "}":
            scan.skip()
            scan.at_end()
            return outline
        else:
            raise scan.error("Expecting ',' delimiter")


def _skim_list(scan: _Scanner, max_items: int) -> None:
    """Step over a list, decoding its items one at a time; _TooLong past `max_items` of them."""
    scan.skip()
    if scan.peek() == "]":
        scan.skip()
        return
    for _ in range(max_items):
        scan.value()
        if scan.peek() == "]":
            scan.skip()
            return
        if scan.peek() != ",":
            raise scan.error("Expecting ',' delimiter")
        scan.skip()
    raise _TooLong


def _line_column(data: bytes, start: int, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters, as json reports them) of a byte offset."""
    line = data.count(b"\n", start, offset) + 1
    begin = data.rfind(b"\n", start, offset) + 1 or start
    column = offset - begin + 1
    for at in range(begin, offset, _CHUNK):  # less the UTF-8 continuation bytes, a chunk at a time
        column -= len(data[at : min(at + _CHUNK, offset)].translate(None, _NOT_CONTINUATION))
    return line, column


@dataclass(frozen=True)
class _Unreadable:
    """A record that could not be decoded; kept in place so problems are listed in file order."""

    problem: str


def _jsonl_entries(
    data: bytes, start: int, name: str, max_records: int, cap: int
) -> Iterator[tuple[int, str, Any]]:
    # Split on "\n" only: str.splitlines would also split on U+2028, U+0085 and others that JSON
    # allows raw inside strings. A trailing "\r" (CRLF files) is JSON whitespace. Each line is
    # measured before it is copied out of `data`, and decoded only when within the cap.
    count, number, pos = 0, 0, start
    while pos <= len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        number, begin, pos = number + 1, pos, end + 1
        size = end - begin
        line = data[begin:end].decode() if size <= cap else ""
        if (not line or line.isspace()) if size <= cap else _BLANK.fullmatch(data, begin, end):
            continue
        count += 1
        if count > max_records:
            raise DatasetError([_too_many(max_records)], name)
        if size > cap:
            yield number, f"line {number}", _Unreadable(_too_long_line(size, cap))
            continue
        value = _decode_line(line)
        line = ""
        yield number, f"line {number}", value
        value = None


def _decode_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        hint = _json_hint(e.msg, "one complete object per line")
        return _Unreadable(f"invalid JSON at column {e.colno}: {hint}")
    except (ValueError, RecursionError) as e:
        return _Unreadable(_unreadable(e))


def _json_hint(msg: str, usual: str) -> str:
    if msg.startswith("Invalid control character"):
        return (
            "a raw control character (tab, line break or NUL byte) inside a string;"
            r" write it as \t or \n, or remove it"
        )
    return f"{msg} (check for {usual}, or an unescaped quote)"


def _unreadable(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "the JSON is nested too deeply to read; records must be flat objects of strings"
    # json.loads raises a plain ValueError for integers over Python's digit limit.
    return "a number is too long to read; put it in quotes as a string"


# --- reporting -------------------------------------------------------------------------------


def _mixed_shapes(by_shape: dict[Shape, list[str]]) -> str:
    parts = []
    for shape, wheres in by_shape.items():
        first = ", ".join(wheres[:3]) + (", ..." if len(wheres) > 3 else "")
        parts.append(f"{len(wheres)} {shape} ({first})")
    return "the file mixes record shapes: " + "; ".join(parts) + "; use one shape for the whole file"


def _top_level_problem(value: Any) -> str:
    problem = f"the top level is {type_name(value, article=True)}, expected a list of records"
    if not isinstance(value, dict):
        return problem + " such as [{...}, {...}]"
    lists = [k for k, v in value.items() if isinstance(v, list)]
    if shape_of(value) is not None:
        return problem + "; this looks like a single record: wrap it in [ ] or use JSON Lines (.jsonl)"
    if len(lists) == 1:
        return problem + f"; the records seem to be under {quote(lists[0])}: save that list as the whole file"
    return problem + "; save the records as [{...}, {...}] or as JSON Lines (.jsonl, one object per line)"


def _too_big(size: int, max_bytes: int) -> str:
    return (
        f"the file is {_size(size)}, over the limit of {_size(max_bytes)};"
        " split it into smaller files (or raise max_bytes)"
    )


def _too_long_line(size: int, cap: int) -> str:
    return (
        f"{size:,} bytes, over the limit of {_size(cap)} per record;"
        " shorten or split the record (or raise max_record_bytes)"
    )


def _too_long_record(cap: int, line: int) -> str:
    return (
        f"over the limit of {_size(cap)} per record (it starts on line {line});"
        " shorten or split the record (or raise max_record_bytes); the records after it were not read"
    )


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _too_many(max_records: int) -> str:
    return f"more than {max_records:,} records, the limit; use fewer records (or raise max_records)"
