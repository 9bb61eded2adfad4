"""Property tests: whatever bytes a user uploads, parse_records returns valid Records or raises
DatasetError, never anything else. The default run is small; `-m slow` runs the same properties at
10,000 examples each."""

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.data.dataset_file import parse_records
from finetune.data.records import ROLES, DatasetError, Message, Record

FAST = settings(
    max_examples=200,
    deadline=None,
    database=None,  # keep the tree clean; failures print their reproducing example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
SLOW = settings(FAST, max_examples=10_000)

BAD_CHAR = re.compile("[\x00\ud800-\udfff]")
NAMES = st.sampled_from(["d.json", "d.jsonl", "<data>", "upload.txt"])
FORMATS = st.sampled_from(["auto", "json", "jsonl"])


@st.composite
def rarely(draw: st.DrawFn, common: st.SearchStrategy, rare: st.SearchStrategy, one_in: int) -> Any:
    """`rare` about once in `one_in` draws: files are mostly plausible, with some damage."""
    return draw(rare if draw(st.integers(0, one_in - 1)) == 0 else common)


# Small caps now and then, so the cap paths are fuzzed as well as the defaults.
CAPS = st.fixed_dictionaries(
    {
        "max_record_chars": rarely(st.just(200_000), st.just(8), 6),
        "max_records": rarely(st.just(1_000_000), st.just(3), 6),
        "max_bytes": rarely(st.just(512 * 2**20), st.just(200), 6),
        "max_record_bytes": rarely(st.just(2 * 2**20), st.integers(1, 120), 6),
    }
)


def outcome(data: bytes, name: str = "<data>", fmt: str = "auto", **caps: int) -> list[Record] | DatasetError:
    """parse_records' result, checked: valid Records or a readable DatasetError, nothing else."""
    try:
        records = parse_records(data, name, fmt=fmt, **caps)
    except DatasetError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
        assert e.path == name
        str(e).encode("utf-8")  # printable: no lone surrogates from the input leak into the report
        return e
    assert records
    assert len({r.shape for r in records}) == 1
    numbers = [r.number for r in records]
    assert numbers == sorted(set(numbers)) and numbers[0] >= 1
    for record in records:
        assert_valid(record, caps.get("max_record_chars", 200_000))
    return records


def problems_of(data: bytes, name: str = "d.json", **caps: int) -> list[str]:
    result = outcome(data, name, **caps)
    assert isinstance(result, DatasetError)
    return result.problems


def assert_valid(r: Record, max_chars: int) -> None:
    required = {
        "alpaca": (r.instruction, r.output),
        "completion": (r.prompt, r.output),
        "text": (r.text,),
        "messages": tuple(m.content for m in r.messages),
    }[r.shape]
    assert all(isinstance(s, str) and s.strip() for s in required)
    assert not any(BAD_CHAR.search(s) for s in (*required, r.input))
    assert sum(map(len, (*required, r.input))) <= max_chars
    if r.shape == "messages":
        roles = [m.role for m in r.messages]
        assert set(roles) <= set(ROLES) and roles[-1] == "assistant"
        assert "system" not in roles[1:]
    unused = {
        "alpaca": (r.prompt, r.text, r.messages),
        "completion": (r.instruction, r.input, r.text, r.messages),
        "text": (r.instruction, r.input, r.output, r.prompt, r.messages),
        "messages": (r.instruction, r.input, r.output, r.prompt, r.text),
    }[r.shape]
    assert not any(unused)


# --- strategies --------------------------------------------------------------------------------

# Any text, lone surrogates included (st.text leaves them out by default).
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=8)
ANY_KEY = ANY_TEXT | st.sampled_from(
    ["\ud800", "a\udfff", "\x00", "instruction", "output", "text", "messages"]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(ANY_KEY, children, max_size=5),
    max_leaves=20,
)
# Stands for a number over Python's 4300-digit limit, which json.dumps cannot write itself.
BIG_NUMBER = "<a 5000-digit number>"
# Strings a user's file might hold: ordinary, blank, Chinese, or carrying NUL / lone surrogates.
TEXTS = rarely(
    st.text(min_size=1, max_size=30),
    st.sampled_from(["", " ", "\n", "\t \r\n", "你好，世界", "\x00", "a\ud800b", "\udfff", "x" * 25]),
    20,
)
VALUES = rarely(
    TEXTS,
    st.one_of(st.none(), st.integers(), st.booleans(), st.lists(TEXTS, max_size=2), st.just(BIG_NUMBER)),
    20,
)


def message(roles: st.SearchStrategy) -> st.SearchStrategy:
    bad_roles = st.one_of(st.sampled_from(["bot", "User", ""]), st.none(), st.integers())
    return rarely(
        st.fixed_dictionaries(
            {"role": rarely(roles, bad_roles, 30), "content": TEXTS}, optional={"name": VALUES}
        ),
        st.dictionaries(st.sampled_from(["role", "content"]), VALUES, max_size=2) | VALUES,
        30,
    )


# A system message now and then, then user/assistant turns, with some damage.
MESSAGES = rarely(
    st.builds(
        lambda system, turns: system + turns,
        st.lists(message(st.just("system")), max_size=1),
        st.lists(
            message(rarely(st.sampled_from(["user", "assistant"]), st.just("system"), 10)),
            min_size=1,
            max_size=3,
        ),
    ),
    VALUES,
    20,
)
EXTRA_KEYS = {"id": VALUES, "问题": VALUES}
SHAPE_KEYS = ["instruction", "input", "output", "prompt", "completion", "text", "messages"]
# One strategy per shape (plus keys picked at random); a file draws one, then mostly its records.
OBJECTS = [
    st.fixed_dictionaries(
        {"instruction": VALUES, "output": VALUES}, optional={"input": VALUES, "text": TEXTS, **EXTRA_KEYS}
    ),
    st.fixed_dictionaries({"prompt": VALUES, "completion": VALUES}, optional={"text": TEXTS, **EXTRA_KEYS}),
    st.fixed_dictionaries({"messages": MESSAGES}, optional={"text": TEXTS, **EXTRA_KEYS}),
    st.fixed_dictionaries({"text": VALUES}, optional=EXTRA_KEYS),
    st.dictionaries(st.sampled_from([*SHAPE_KEYS, "id", "问题", "\ud800"]), VALUES | MESSAGES, max_size=5),
]
PLAUSIBLE_RECORDS = st.sampled_from(OBJECTS).flatmap(
    lambda common: st.lists(rarely(common, st.one_of(*OBJECTS, VALUES), 10), min_size=1, max_size=4)
)
JSON_TOKENS = st.lists(
    st.sampled_from(
        [b"[", b"]", b"{", b"}", b",", b":", b" ", b"\n", b"\r\n", b'"instruction"', b'"output"', b'"text"']
        + [b'"messages"', b'"role"', b'"content"', b'"user"', b'"assistant"', b'"x"', b'""', b"1", b"1e999"]
        + [b"null", b"true", b'"\\u0000"', b'"\\ud800"', b"\xef\xbb\xbf", b"\xff", b"\x00", b"\xe4\xbd\xa0"]
        + [b"9" * 5000]
    ),
    max_size=40,
).map(b"".join)


def dumps(value: Any, ensure_ascii: bool, indent: int | None = None) -> bytes:
    # surrogatepass: a lone surrogate written raw becomes invalid UTF-8, as in a broken real file.
    data = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent).encode("utf-8", "surrogatepass")
    return data.replace(json.dumps(BIG_NUMBER).encode(), b"9" * 5000)


def as_jsonl(values: list, ensure_ascii: bool) -> bytes:
    return b"".join(dumps(v, ensure_ascii) + b"\n" for v in values)


@st.composite
def mutated(draw: st.DrawFn, source: st.SearchStrategy[bytes]) -> bytes:
    """Valid-looking bytes with a few bytes flipped, cut or inserted."""
    data = bytearray(draw(source))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.sampled_from([0, 0x0A, 0x22, 0x5B, 0x7B, 0x2C, 0x80, 0xE9, 0xFF]))
        if action == "insert":
            data.insert(at, byte)
        elif at < len(data):
            if action == "delete":
                del data[at]
            else:
                data[at] = byte
    return bytes(data)


# --- properties --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Property:
    name: str
    strategy: st.SearchStrategy
    check: Callable[..., None]


def check_bytes(case: tuple) -> None:
    data, name, fmt, caps = case
    outcome(data, name, fmt, **caps)


def check_json_value(case: tuple) -> None:
    value, ensure_ascii, name = case
    outcome(dumps(value, ensure_ascii), name)
    if isinstance(value, list):
        outcome(as_jsonl(value, ensure_ascii), "d.jsonl")


def check_plausible_records(case: tuple) -> None:
    values, ensure_ascii, indent, caps = case
    for data, name in [
        (dumps(values, ensure_ascii, indent), "d.json"),
        (as_jsonl(values, ensure_ascii), "d.jsonl"),
    ]:
        result = outcome(data, name, **caps)
        if isinstance(result, list):
            assert len(result) == len(values)  # no record silently dropped
            if name == "d.json":
                assert [r.number for r in result] == list(range(1, len(values) + 1))


VALID_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1).filter(
    str.strip
)
# (raw record, expected Record) pairs, one strategy per shape.
VALID_RECORDS = [
    st.builds(
        lambda i, x, o: (
            {"instruction": i, "input": x, "output": o},
            Record("alpaca", instruction=i, input=x, output=o),
        ),
        VALID_TEXT,
        VALID_TEXT | st.just(""),
        VALID_TEXT,
    ),
    st.builds(
        lambda p, c: ({"prompt": p, "completion": c}, Record("completion", prompt=p, output=c)),
        VALID_TEXT,
        VALID_TEXT,
    ),
    st.builds(lambda t: ({"text": t}, Record("text", text=t)), VALID_TEXT),
    st.builds(
        lambda turns: (
            {"messages": [{"role": r, "content": c} for r, c in turns]},
            Record("messages", messages=tuple(Message(r, c) for r, c in turns)),
        ),
        st.builds(
            lambda system, middle, answer: [*system, *middle, ("assistant", answer)],
            st.lists(st.tuples(st.just("system"), VALID_TEXT), max_size=1),
            st.lists(st.tuples(st.sampled_from(["user", "assistant"]), VALID_TEXT), max_size=3),
            VALID_TEXT,
        ),
    ),
]
SAME_SHAPE_RECORDS = st.one_of([st.lists(pairs, min_size=1, max_size=5) for pairs in VALID_RECORDS])


def check_valid_round_trip(case: tuple) -> None:
    """Every well-formed file is accepted unchanged, whatever its BOM, line endings or layout."""
    pairs, ensure_ascii, bom, crlf = case
    raw = [p[0] for p in pairs]
    for name, data in [
        ("d.json", dumps(raw, ensure_ascii, indent=1)),
        ("d.jsonl", as_jsonl(raw, ensure_ascii)),
    ]:
        data = (b"\xef\xbb\xbf" if bom else b"") + (data.replace(b"\n", b"\r\n") if crlf else data)
        records = parse_records(data, name)
        assert [
            (r.shape, r.instruction, r.input, r.output, r.prompt, r.messages, r.text) for r in records
        ] == [(e.shape, e.instruction, e.input, e.output, e.prompt, e.messages, e.text) for _, e in pairs]


def check_conversation(turns: list[tuple[str, str]]) -> None:
    """Well-formed turns in any role order: accepted exactly when the conversation rules hold."""
    roles = [role for role, _ in turns]
    ok = roles[-1] == "assistant" and "system" not in roles[1:]
    data = dumps([{"messages": [{"role": r, "content": c} for r, c in turns]}], False)
    assert isinstance(outcome(data, "d.json"), list) == ok


def check_bad_character(case: tuple) -> None:
    """A NUL or lone surrogate anywhere in a field is rejected at its position, whatever the escaping."""
    before, bad, after, field, ensure_ascii = case
    record = {"instruction": "i", "output": "o", field: before + bad + after}
    what = "a NUL character" if bad == "\x00" else "a lone surrogate (a broken \\u escape)"
    expected = f'line 1: "{field}" contains {what} at character {len(before) + 1}; remove it'
    data = as_jsonl([record], ensure_ascii)
    if ensure_ascii or bad == "\x00":
        assert problems_of(data, "d.jsonl")[0] == expected
    else:  # written raw, a lone surrogate is not UTF-8 at all
        assert problems_of(data, "d.jsonl")[0].startswith("the file is not UTF-8: byte 0xED")


def check_mixed_shapes(case: tuple) -> None:
    """Valid records of two shapes in one file: rejected for the mix, and for nothing else."""
    first, second, at = case
    raw = [p[0] for p in first]
    raw.insert(min(at, len(raw)), second[0])
    for name, data in [("d.json", dumps(raw, False)), ("d.jsonl", as_jsonl(raw, False))]:
        (problem,) = problems_of(data, name)
        assert problem.startswith("the file mixes record shapes: ")


def check_byte_cap(case: tuple) -> None:
    """A small byte cap, so values are read through many windows: records within it read as with
    the default, and the first one past it (every one, in JSON Lines) is refused by its number."""
    pairs, ensure_ascii, crlf, cap = case
    texts = [dumps(p[0], ensure_ascii) for p in pairs]
    eol = b"\r\n" if crlf else b"\n"
    fix = "shorten or split the record (or raise max_record_bytes)"
    limit = f"over the limit of {cap:,} bytes per record"
    for name, data, over in [
        ("d.json", b"[" + (b"," + eol).join(texts) + b"]", [len(t) > cap for t in texts]),
        ("d.jsonl", b"".join(t + eol for t in texts), [len(t + eol) - 1 > cap for t in texts]),
    ]:
        result = outcome(data, name, max_record_bytes=cap)
        if not any(over):
            assert result == parse_records(data, name)
        elif name == "d.json":
            n = over.index(True) + 1
            assert result.problems == [
                f"record {n}: {limit} (it starts on line {n}); {fix}; the records after it were not read"
            ]
        else:
            assert result.problems == [
                f"line {n}: {len(t + eol) - 1:,} bytes, {limit}; {fix}"
                for n, (t, o) in enumerate(zip(texts, over, strict=True), 1)
                if o
            ]


PROPERTIES = [
    Property("arbitrary bytes", st.tuples(st.binary(max_size=600), NAMES, FORMATS, CAPS), check_bytes),
    Property("json tokens", st.tuples(JSON_TOKENS, NAMES, FORMATS, CAPS), check_bytes),
    Property(
        "mutated records",
        st.tuples(
            mutated(PLAUSIBLE_RECORDS.map(lambda v: dumps(v, False, 1))),
            NAMES,
            FORMATS,
            CAPS,
        ),
        check_bytes,
    ),
    Property("json values", st.tuples(JSON_VALUES, st.booleans(), NAMES), check_json_value),
    Property(
        "plausible records",
        st.tuples(
            PLAUSIBLE_RECORDS,
            st.booleans(),
            st.sampled_from([None, 2]),
            CAPS,
        ),
        check_plausible_records,
    ),
    Property(
        "valid round trip",
        st.tuples(SAME_SHAPE_RECORDS, st.booleans(), st.booleans(), st.booleans()),
        check_valid_round_trip,
    ),
    Property(
        "byte cap",
        st.tuples(
            st.one_of([st.lists(pairs, min_size=1, max_size=12) for pairs in VALID_RECORDS]),
            st.booleans(),
            st.booleans(),
            st.integers(1, 300),
        ),
        check_byte_cap,
    ),
    Property(
        "conversations",
        st.lists(st.tuples(st.sampled_from(ROLES), VALID_TEXT), min_size=1, max_size=5),
        check_conversation,
    ),
    Property(
        "bad characters",
        st.tuples(
            VALID_TEXT,
            st.sampled_from(["\x00", "\ud800", "\udbff", "\udc00", "\udfff"]),
            st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00")),
            st.sampled_from(["instruction", "input", "output"]),
            st.booleans(),
        ),
        check_bad_character,
    ),
    Property(
        "mixed shapes",
        st.sampled_from(range(len(VALID_RECORDS))).flatmap(
            lambda i: st.tuples(
                st.lists(VALID_RECORDS[i], min_size=1, max_size=4),
                st.one_of(*VALID_RECORDS[:i], *VALID_RECORDS[i + 1 :]),
                st.integers(0, 4),
            )
        ),
        check_mixed_shapes,
    ),
]


def run(prop: Property, profile: settings) -> int:
    calls = 0

    # A fresh @given function per run, so one property can run under both settings profiles.
    @profile
    @given(prop.strategy)
    def test(case: Any) -> None:
        nonlocal calls
        calls += 1
        prop.check(case)

    test()
    return calls


@pytest.mark.parametrize("prop", PROPERTIES, ids=lambda p: p.name)
def test_property(prop: Property):
    run(prop, FAST)


@pytest.mark.slow
@pytest.mark.parametrize("prop", PROPERTIES, ids=lambda p: p.name)
def test_property_at_scale(prop: Property):
    start = time.perf_counter()
    calls = run(prop, SLOW)
    print(f"{prop.name}: {calls} examples in {time.perf_counter() - start:.1f}s")


# --- hand-written hostile inputs ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["d.json", "d.jsonl"])
def test_a_50mb_record_is_over_the_byte_cap_before_it_is_decoded(name):
    record = {"instruction": "总结这篇文章。", "input": "x" * 50_000_000, "output": "ok"}
    data = json.dumps([record] if name == "d.json" else record, ensure_ascii=False).encode()
    fix = "shorten or split the record (or raise max_record_bytes)"
    assert problems_of(data, name) == [
        f"record 1: over the limit of 2.0 MiB per record (it starts on line 1); {fix};"
        " the records after it were not read"
        if name == "d.json"
        else f"line 1: {len(data):,} bytes, over the limit of 2.0 MiB per record; {fix}"
    ]


@pytest.mark.parametrize("name", ["d.json", "d.jsonl"])
def test_a_record_within_the_byte_cap_is_held_to_the_character_cap(name):
    record = {"instruction": "总结这篇文章。", "input": "文" * 250_000, "output": "ok"}  # 750 KB
    data = json.dumps([record] if name == "d.json" else record, ensure_ascii=False).encode()
    where = "record 1" if name == "d.json" else "line 1"
    assert problems_of(data, name) == [
        f"{where}: 250,009 characters, over the limit of 200,000 per record;"
        " shorten or split the record (or raise max_record_chars)"
    ]


DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
TOO_DEEP = "the JSON is nested too deeply to read; records must be flat objects of strings"


@pytest.mark.parametrize(
    ("data", "name", "expected"),
    [
        (DEEP, "d.json", TOO_DEEP),
        (DEEP, "d.jsonl", f"line 1: {TOO_DEEP}"),
        (DEEP_OBJECT, "d.json", TOO_DEEP),
        (DEEP_OBJECT, "<data>", f"line 1: {TOO_DEEP}"),
        (b'[{"text": ' + DEEP + b"}]", "d.json", TOO_DEEP),
        (b'{"text": "ok"}\n{"text": ' + DEEP + b"}\n", "d.jsonl", f"line 2: {TOO_DEEP}"),
    ],
)
def test_json_nested_100k_deep(data, name, expected):
    assert problems_of(data, name) == [expected]


def test_nesting_within_the_parser_limit_in_an_ignored_key_is_fine():
    data = b'[{"text": "ok", "meta": ' + b"[" * 500 + b"]" * 500 + b"}]"
    assert outcome(data, "d.json") == [Record("text", text="ok", number=1)]


@pytest.mark.parametrize(
    ("data", "name", "expected"),
    [
        (b"\x00" * 64, "d.json", "line 1, column 1: invalid JSON: Expecting value"),
        (b"\x00" * 64, "d.jsonl", "line 1: invalid JSON at column 1: Expecting value"),
        (b'[{"text": "a"}\x00]', "d.json", "line 1, column 15: invalid JSON: Expecting ',' delimiter"),
        (b'[{"text": "a\x00b"}]', "d.json", "line 1, column 13: invalid JSON: a raw control character"),
        (
            b'{"text": "\\u0000"}',
            "d.jsonl",
            'line 1: "text" contains a NUL character at character 1; remove it',
        ),
    ],
)
def test_nul_bytes(data, name, expected):
    (problem,) = problems_of(data, name)
    assert problem.startswith(expected)


def test_latin1_bytes_in_a_utf8_file():
    good = '{"text": "你好"}\n{"text": "naïve"}\n'.encode()
    data = good + '{"text": "café"}\n'.encode("latin-1")
    (problem,) = problems_of(data, "d.jsonl")
    assert problem.startswith(f"the file is not UTF-8: byte 0xE9 at byte offset {len(good) + 13} (line 3)")


@pytest.mark.parametrize(
    "data",
    [
        b'[{"text": "\xed\xa0\x80"}]',  # a surrogate encoded as UTF-8 (CESU-8 / WTF-8)
        b'[{"text": "\xc0\xaf"}]',  # an overlong encoding
        b'[{"text": "\xe4\xbd"}]',  # a character cut in half
    ],
)
def test_invalid_utf8_sequences(data):
    (problem,) = problems_of(data)
    assert problem.startswith("the file is not UTF-8: byte 0x")
    assert "at byte offset 11 (line 1)" in problem


def test_a_number_with_too_many_digits():
    assert problems_of(b'{"text": ' + b"9" * 5000 + b"}", "d.jsonl") == [
        "line 1: a number is too long to read; put it in quotes as a string"
    ]


def test_surrogate_in_a_key_is_escaped_in_the_report():
    (problem,) = problems_of(b'[{"\\ud800\\u0000": 1}]')
    assert problem.startswith('record 1: unknown shape with keys "\\ud800\\u0000";')


def test_long_unknown_keys_are_shortened():
    (problem,) = problems_of(json.dumps([{"k" * 1000: 1}]).encode())
    assert len(problem) < 400
    assert '"' + "k" * 40 + '…"' in problem
