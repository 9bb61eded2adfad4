"""Memory bounds of reading a dataset a stranger sent. `{}` is 3 bytes in a file and ~70 as a Python
dict, so decoding a whole file, or a whole record with a junk key, costs ~25x its size: records are
decoded one at a time, each held to a byte cap (unknown keys included) before it is decoded, and
the file is never turned into one string."""

import contextlib
import json
import tracemalloc

import pytest

from finetune.data import dataset_file
from finetune.data.dataset_file import parse_records, read_records
from finetune.data.records import DatasetError, Record

FIX = "shorten or split the record (or raise max_record_bytes)"
NOT_READ = "the records after it were not read"


def problems_of(data: bytes, name: str = "d.json", **caps: int) -> list[str]:
    with pytest.raises(DatasetError) as info:
        parse_records(data, name, **caps)
    return info.value.problems


def junk(count: int) -> bytes:
    return b"[" + b",".join([b"{}"] * count) + b"]"


def record(i: int, junk_count: int = 0, output: str = "answer") -> bytes:
    extra = b', "junk": ' + junk(junk_count) if junk_count else b""
    return b'{"instruction": "task %d", "output": %s%s}' % (i, json.dumps(output).encode(), extra)


def as_list(items: list[bytes]) -> bytes:
    return b"[" + b",\n".join(items) + b"]"


def as_lines(items: list[bytes]) -> bytes:
    return b"".join(item + b"\n" for item in items)


def peak_while(fn) -> int:
    """Bytes allocated at the peak while fn() runs, beyond what was held before."""
    tracemalloc.start()
    try:
        with contextlib.suppress(DatasetError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- the byte cap --------------------------------------------------------------------------------

# 1,000,000 `{}` in an unknown key: 3 MB of JSON, past the 2 MiB default, ~70 MB once decoded.
OVER = [record(1), record(2), record(3, 1_000_000), record(4, output="")]


def test_a_list_record_over_the_byte_cap_is_refused_with_its_number_and_line():
    assert problems_of(as_list(OVER)) == [
        f"record 3: over the limit of 2.0 MiB per record (it starts on line 3); {FIX}; {NOT_READ}"
    ]


def test_a_jsonl_line_over_the_byte_cap_is_refused_undecoded_and_the_rest_are_checked(monkeypatch):
    longest, loads = 0, json.loads

    def spy(text, *args, **kwargs):
        nonlocal longest
        longest = max(longest, len(text))
        return loads(text, *args, **kwargs)

    monkeypatch.setattr(dataset_file.json, "loads", spy)
    assert problems_of(as_lines(OVER), "d.jsonl") == [
        f"line 3: {len(OVER[2]):,} bytes, over the limit of 2.0 MiB per record; {FIX}",
        'line 4: "output" is empty; fill it in or remove the record',
    ]
    assert 0 < longest < 100  # only the short lines were decoded


@pytest.mark.parametrize(
    ("name", "encode", "where"), [("d.json", as_list, "record"), ("d.jsonl", as_lines, "line")]
)
def test_unknown_keys_count_toward_the_byte_cap(name, encode, where):
    """100,000 `{}` under an unknown key: ignored within the cap, refused past it."""
    data = encode([record(1), record(2, 100_000)])  # record 2 is ~300 KB
    expected = [
        Record("alpaca", instruction="task 1", output="answer", number=1),
        Record("alpaca", instruction="task 2", output="answer", number=2),
    ]
    assert parse_records(data, name) == expected
    (problem,) = problems_of(data, name, max_record_bytes=256 * 1024)
    assert problem.startswith(f"{where} 2: ")
    assert "over the limit of 262,144 bytes per record" in problem


@pytest.mark.parametrize("text", ["plain", "中文 with 😀 in it"])
@pytest.mark.parametrize(
    ("name", "encode", "where"), [("d.json", as_list, "record"), ("d.jsonl", as_lines, "line")]
)
def test_the_byte_cap_is_exact_wherever_the_record_falls(text, name, encode, where):
    """Many more records than one window holds: a record exactly at the cap is read, and the one
    record a byte or more past it is refused by its number."""
    items = [json.dumps({"text": text + "x" * (i % 40)}, ensure_ascii=False).encode() for i in range(400)]
    cap = max(map(len, items))
    items[350] = json.dumps({"text": text + "y" * 40}, ensure_ascii=False).encode()
    assert len(items[350]) == cap + 1
    kept = items[:350] + items[351:]
    assert [r.text for r in parse_records(encode(kept), name, max_record_bytes=cap)] == [
        json.loads(item)["text"] for item in kept
    ]
    (problem,) = problems_of(encode(items), name, max_record_bytes=cap)
    assert problem.startswith(f"{where} 351: ")
    assert f"over the limit of {cap} bytes per record" in problem


# --- memory --------------------------------------------------------------------------------------

# ~4 MB files of records that are each within the cap but mostly `{}`.
N_JUNK_RECORDS = 2_600


@pytest.mark.parametrize("form", ["list", "jsonl", "object"])
def test_reading_junk_filled_records_stays_near_the_file_size(form):
    items = [record(i, 500) for i in range(1, N_JUNK_RECORDS + 1)]
    if form == "list":
        name, data = "d.json", as_list(items)
    elif form == "jsonl":
        name, data = "d.jsonl", as_lines(items)
    else:
        name, data = "d.json", b'{"version": 1, "data": ' + as_list(items) + b"}"
    peak = peak_while(lambda: parse_records(data, name))
    # Beyond the file's own bytes: a window of its text and the records (~1x); was ~25x.
    assert peak < 2 * len(data), f"{peak / len(data):.1f}x the file"
    if form == "object":  # refused as before, read as the list form is
        with pytest.raises(DatasetError, match='the records seem to be under "data"'):
            parse_records(data, name)
    else:
        assert len(parse_records(data, name)) == N_JUNK_RECORDS


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            as_list([record(1, 2_000_000)]),
            f"record 1: over the limit of 65,536 bytes per record (it starts on line 1); {FIX}; {NOT_READ}",
        ),
        (
            record(1, 2_000_000),  # a single record as the whole .json file
            "the top level is an object, expected a list of records;"
            " this looks like a single record: wrap it in [ ] or use JSON Lines (.jsonl)",
        ),
    ],
    ids=["in a list", "as the file"],
)
def test_a_6mb_junk_record_is_refused_without_being_decoded_whole(data, expected):
    cap = 64 * 1024
    assert problems_of(data, max_record_bytes=cap) == [expected]
    peak = peak_while(lambda: parse_records(data, "d.json", max_record_bytes=cap))
    assert peak < len(data), f"{peak / len(data):.1f}x the file"  # was ~25x: all of it decoded


def test_an_object_file_is_refused_the_same_whatever_its_size():
    small = [record(1), record(2)]
    big = [record(i, 100) for i in range(1, 20_000)]  # ~6 MB, past the window
    one = 'the top level is an object, expected a list of records; the records seem to be under "data":'
    two = "the top level is an object, expected a list of records; save the records as [{...}, {...}]"
    for items in (small, big):
        assert problems_of(b'{"data": ' + as_list(items) + b', "n": 2}')[0].startswith(one)
        assert problems_of(b'{"train": ' + as_list(items) + b', "test": []}')[0].startswith(two)


def test_one_emoji_does_not_make_the_whole_file_four_byte_text():
    """A str holding one character past U+FFFF takes 4 bytes per character; the file is decoded a
    window at a time (~2x the byte cap, small here), so that costs the window, not the file."""
    items = [json.dumps({"text": "😀"}, ensure_ascii=False).encode()]
    items += [json.dumps({"text": "x" * 1000}).encode()] * 6_000  # ~6 MB
    data = as_list(items)
    peak = peak_while(lambda: parse_records(data, max_record_bytes=64 * 1024))
    assert peak < 1.5 * len(data), f"{peak / len(data):.1f}x the file"  # the records, ~1x; was ~5x


def test_reading_a_small_file_does_not_set_aside_a_buffer_the_size_of_the_cap(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(as_lines([record(1)]))
    assert peak_while(lambda: read_records(path)) < 2**20  # was 512 MiB: f.read(max_bytes + 1)


# --- positions past the first window --------------------------------------------------------------


@pytest.mark.parametrize(
    "broken",
    [
        b'{"text": "a"} {"text": "b"}',  # a missing comma
        '{"text": "中文 a\tb"}'.encode(),  # a raw tab after wide characters
        b'{"text": "x", }',  # an extra comma
        b'{"text" "x"}',
    ],
)
def test_invalid_json_far_into_the_file_names_the_line_and_column_json_does(broken):
    items = [json.dumps({"text": "好" * (i % 30)}, ensure_ascii=False).encode() for i in range(300)]
    data = as_list([*items, b"  " + broken, *items])
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(data)
    (problem,) = problems_of(data, max_record_bytes=256)  # windows of ~600 bytes
    assert problem.startswith(f"line {expected.value.lineno}, column {expected.value.colno}: invalid JSON: ")
