import hashlib
import json
import pickle

import pytest

from finetune.config import SAMPLE_DATA
from finetune.data.dataset_file import parse_records, read_records
from finetune.data.records import DatasetError, Message, Record, dataset_fingerprint, split_records

ALPACA_NEED = '(Alpaca records need "instruction" and "output" strings)'


def as_json(records: list) -> bytes:
    return json.dumps(records, ensure_ascii=False, indent=2).encode()


def as_jsonl(records: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def problems_of(data: bytes, name: str = "data.json", **kwargs) -> list[str]:
    with pytest.raises(DatasetError) as info:
        parse_records(data, name, **kwargs)
    assert info.value.path == name
    return info.value.problems


def alpaca(i: int) -> dict:
    return {"instruction": f"task {i}", "output": f"answer {i}"}


# --- accepted shapes ---------------------------------------------------------------------------

SHAPES = [
    (
        {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
        Record("alpaca", instruction="Add the numbers.", input="2, 3", output="5", number=1),
    ),
    (
        {"instruction": "Say hi.", "output": "Hi!"},
        Record("alpaca", instruction="Say hi.", output="Hi!", number=1),
    ),
    (
        {"prompt": "The capital of France is", "completion": " Paris."},
        Record("completion", prompt="The capital of France is", output=" Paris.", number=1),
    ),
    (
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
            ]
        },
        Record(
            "messages",
            messages=(Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello.")),
            number=1,
        ),
    ),
    ({"text": "Once upon a time."}, Record("text", text="Once upon a time.", number=1)),
]


@pytest.mark.parametrize(("raw", "expected"), SHAPES, ids=lambda v: getattr(v, "shape", ""))
@pytest.mark.parametrize(("name", "encode"), [("d.json", as_json), ("d.jsonl", as_jsonl)])
def test_every_shape_in_json_and_jsonl(raw, expected, name, encode):
    assert parse_records(encode([raw]), name) == [expected]


def test_values_are_kept_verbatim_and_numbered_in_order():
    data = as_json([{"instruction": "  spaced ", "input": "", "output": "line\nbreak "}, alpaca(2)])
    first, second = parse_records(data, "d.json")
    assert (first.instruction, first.input, first.output, first.number) == (
        "  spaced ",
        "",
        "line\nbreak ",
        1,
    )
    assert second.number == 2


def test_jsonl_numbers_are_line_numbers_and_blank_lines_are_skipped():
    data = b'\n{"text": "a"}\n   \n\n{"text": "b"}\n\n'
    assert [(r.text, r.number) for r in parse_records(data, "d.jsonl")] == [("a", 2), ("b", 5)]


@pytest.mark.parametrize(("name", "encode"), [("d.json", as_json), ("d.jsonl", as_jsonl)])
def test_bom_and_crlf(name, encode):
    data = b"\xef\xbb\xbf" + encode([alpaca(1), alpaca(2)]).replace(b"\n", b"\r\n")
    records = parse_records(data, name)
    assert [r.instruction for r in records] == ["task 1", "task 2"]
    assert records[1].output == "answer 2"  # no stray "\r"


@pytest.mark.parametrize(("name", "encode"), [("d.json", as_json), ("d.jsonl", as_jsonl)])
def test_chinese_text(name, encode):
    raw = {
        "instruction": "把句子翻译成英文。",
        "input": "今天天气很好。",
        "output": "The weather is nice today.",
    }
    (record,) = parse_records(encode([raw]), name)
    assert (record.instruction, record.input) == ("把句子翻译成英文。", "今天天气很好。")


def test_unicode_line_separators_inside_jsonl_strings_are_not_line_breaks():
    (record,) = parse_records('{"text": "a\u2028b\u0085c"}\n'.encode(), "d.jsonl")
    assert record.text == "a\u2028b\u0085c"


def test_extra_keys_are_ignored_and_alpaca_wins_over_its_derived_text():
    raw = {"instruction": "i", "input": "", "output": "o", "text": "### Instruction: i", "id": 7}
    assert parse_records(as_json([raw])) == [Record("alpaca", instruction="i", output="o", number=1)]


def test_null_input_reads_as_empty():
    (record,) = parse_records(as_json([{"instruction": "i", "input": None, "output": "o"}]))
    assert record.input == ""


def test_json_file_holding_json_lines_is_read_as_json_lines():
    # datasets.Dataset.to_json("x.json") writes one object per line.
    records = parse_records(as_jsonl([alpaca(1), alpaca(2)]), "x.json")
    assert [r.number for r in records] == [1, 2]


@pytest.mark.parametrize(
    ("data", "where"),
    [(b' \n[{"text": "a"}, 5]', "record 2"), (b'{"text": "a"}\n5', "line 2")],
)
def test_format_follows_content_without_a_known_extension(data, where):
    assert problems_of(data, "upload.txt") == [f"{where}: expected a JSON object, got number"]


def test_explicit_format_overrides_the_extension():
    assert problems_of(as_jsonl([alpaca(1), alpaca(2)]), "d.jsonl", fmt="json") == [
        "line 2, column 1: invalid JSON: Extra data (check for a missing or extra comma, or an unescaped quote)"
    ]
    assert len(parse_records(as_jsonl([alpaca(1)]), "d.json", fmt="jsonl")) == 1


def test_read_records_reads_a_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(as_jsonl([alpaca(1), alpaca(2)]))
    assert [r.output for r in read_records(path)] == ["answer 1", "answer 2"]


def test_sample_data_is_valid_alpaca():
    records = read_records(SAMPLE_DATA)
    assert len(records) == 40
    assert {r.shape for r in records} == {"alpaca"}
    assert 10 <= sum(bool(r.input) for r in records) <= 16
    assert sum(any("\u4e00" <= c <= "\u9fff" for c in r.instruction) for r in records) == 10


# --- errors ------------------------------------------------------------------------------------


def test_invalid_json_names_line_and_column():
    data = b'[\n  {"text": "a"}\n  {"text": "b"}\n]'
    assert problems_of(data) == [
        "line 3, column 3: invalid JSON: Expecting ',' delimiter"
        " (check for a missing or extra comma, or an unescaped quote)"
    ]


def test_invalid_jsonl_lines_are_all_reported_with_their_columns():
    data = b'{"text": "a"}\n{"text": "b",}\n{"text": "c"}\n{"text" "d"}\n'
    problems = problems_of(data, "d.jsonl")
    assert [p.split(": ")[0] for p in problems] == ["line 2", "line 4"]
    assert problems[0].startswith("line 2: invalid JSON at column 14: Expecting property name")
    assert problems[1].startswith("line 4: invalid JSON at column 9: Expecting ':' delimiter")


def test_raw_control_character_in_a_string_is_explained():
    (problem,) = problems_of(b'[{"text": "a\tb"}]')
    assert problem.startswith("line 1, column 13: invalid JSON: a raw control character")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            b'{"instruction": "i", "output": "o"}',
            "the top level is an object, expected a list of records;"
            " this looks like a single record: wrap it in [ ] or use JSON Lines (.jsonl)",
        ),
        (
            b'{"version": 2, "data": [{"text": "a"}]}',
            'the top level is an object, expected a list of records; the records seem to be under "data":'
            " save that list as the whole file",
        ),
        (b"42", "the top level is a number, expected a list of records such as [{...}, {...}]"),
        (b'"text"', "the top level is a string, expected a list of records such as [{...}, {...}]"),
        (b"null", "the top level is null, expected a list of records such as [{...}, {...}]"),
    ],
)
def test_wrong_top_level_type(data, expected):
    assert problems_of(data, "d.json") == [expected]


def test_missing_field_in_record_17():
    records = [alpaca(i) for i in range(1, 21)]
    del records[16]["output"]
    assert problems_of(as_json(records)) == [f'record 17: missing "output" {ALPACA_NEED}']


def test_missing_field_in_jsonl_names_the_line():
    records = [alpaca(i) for i in range(1, 21)]
    del records[16]["instruction"]
    data = b"\n" + as_jsonl(records)  # a leading blank line shifts every record down one line
    assert problems_of(data, "d.jsonl") == [f'line 18: missing "instruction" {ALPACA_NEED}']


@pytest.mark.parametrize("empty", ["", "   ", "\n\t"])
def test_empty_output(empty):
    records = [alpaca(1), alpaca(2), {"instruction": "i", "output": empty}]
    assert problems_of(as_json(records)) == ['record 3: "output" is empty; fill it in or remove the record']


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"instruction": 5, "output": "o"}, 'record 1: "instruction" must be a string, got number'),
        ({"instruction": "i", "output": None}, 'record 1: "output" must be a string, got null'),
        ({"instruction": "i", "input": ["a"], "output": "o"}, 'record 1: "input" must be a string, got list'),
        ({"prompt": "p", "completion": {"a": 1}}, 'record 1: "completion" must be a string, got object'),
        ({"text": True}, 'record 1: "text" must be a string, got boolean'),
    ],
)
def test_wrong_type(raw, expected):
    assert problems_of(as_json([raw])) == [expected]


def test_record_that_is_not_an_object():
    assert problems_of(as_json([alpaca(1), "just a string"])) == [
        "record 2: expected a JSON object, got string"
    ]


def test_unknown_shape_names_its_keys_and_the_accepted_shapes():
    (problem,) = problems_of(as_json([{"question": "q", "answer": "a"}]))
    assert problem.startswith('record 1: unknown shape with keys "question", "answer"; accepted shapes: ')
    for key in ('"instruction"', '"prompt", "completion"', '"messages"', '{"text"}'):
        assert key in problem


def test_prompt_without_completion_is_a_completion_record_missing_a_key():
    assert problems_of(as_json([{"prompt": "p"}])) == [
        'record 1: missing "completion" (prompt/completion records need "prompt" and "completion" strings)'
    ]


def test_mixed_shapes_name_the_first_records_of_each_shape():
    records = [alpaca(i) for i in range(5)] + [{"text": "t"}] + [{"prompt": "p", "completion": "c"}] * 2
    assert problems_of(as_jsonl(records), "d.jsonl") == [
        "the file mixes record shapes: 5 alpaca (line 1, line 2, line 3, ...); 1 text (line 6);"
        " 2 completion (line 7, line 8); use one shape for the whole file"
    ]


def chat(*turns: tuple) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            chat(("human", "hi"), ("assistant", "hello")),
            ['record 1: messages[0].role is "human"; use "system", "user" or "assistant"'],
        ),
        (
            chat(("user", "hi"), ("assistant", "hello"), ("user", "bye")),
            [
                'record 1: the last message is from "user"; end with an "assistant" message'
                " (the model learns the assistant turns)"
            ],
        ),
        (
            chat(("system", "be kind"), ("user", "hi")),
            ['record 1: "messages" has no "assistant" message; add the reply the model should learn'],
        ),
        (
            chat(("user", "hi"), ("system", "be kind"), ("assistant", "hello")),
            ["record 1: messages[1] is a system message; only the first message may be one"],
        ),
        (
            chat(("user", ""), ("assistant", 3)),
            [
                "record 1: messages[0].content is empty; fill it in or remove the record",
                "record 1: messages[1].content must be a string, got number",
            ],
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, "hello", {"content": "x"}]},
            [
                'record 1: messages[1] must be an object with "role" and "content", got string',
                'record 1: messages[2]: missing "role"',
                'record 1: "messages" has no "assistant" message; add the reply the model should learn',
            ],
        ),
        (
            {"messages": [{"role": None, "content": "x"}, {"role": "assistant"}]},
            [
                "record 1: messages[0].role must be a string, got null",
                'record 1: messages[1]: missing "content"',
            ],
        ),
        (
            {"messages": "hi"},
            ['record 1: "messages" must be a list of {"role", "content"} objects, got string'],
        ),
        (
            {"messages": []},
            ['record 1: "messages" is empty; add the conversation as {"role", "content"} objects'],
        ),
    ],
)
def test_invalid_messages(raw, expected):
    assert problems_of(as_json([raw])) == expected


def test_non_utf8_file_names_the_byte_offset():
    data = '[{"text": "ok"},\n {"text": "café"}]'.encode("latin-1")
    (problem,) = problems_of(data)
    offset = data.index(b"\xe9")
    assert problem.startswith(
        f"the file is not UTF-8: byte 0xE9 at byte offset {offset} (line 2) is not valid UTF-8;"
        " re-save the file as UTF-8"
    )


def test_gbk_file_is_not_utf8():
    (problem,) = problems_of('[{"text": "你好"}]'.encode("gbk"))
    assert problem.startswith("the file is not UTF-8: byte 0xC4 at byte offset 11 (line 1)")
    assert "iconv -f GBK -t UTF-8" in problem


def test_utf16_file_is_named():
    assert problems_of('[{"text": "a"}]'.encode("utf-16")) == [
        "the file is UTF-16 (it starts with a UTF-16 byte order mark); re-save it as UTF-8"
    ]


@pytest.mark.parametrize(
    ("data", "name", "expected"),
    [
        (b"", "d.json", "no records: the file is empty"),
        (b" \r\n\t", "d.jsonl", "no records: the file is empty"),
        (b"\xef\xbb\xbf", "d.json", "no records: the file is empty"),
        (b"[]", "d.json", "no records: the list is empty; add at least one record"),
    ],
)
def test_no_records(data, name, expected):
    assert problems_of(data, name) == [expected]


def test_nul_and_lone_surrogate_escapes_are_rejected():
    data = b'{"text": "a\\u0000b"}\n{"text": "ok"}\n{"text": "x\\ud83d"}\n'
    assert problems_of(data, "d.jsonl") == [
        'line 1: "text" contains a NUL character at character 2; remove it',
        'line 3: "text" contains a lone surrogate (a broken \\u escape) at character 2; remove it',
    ]


def test_paired_surrogate_escapes_are_an_emoji():
    (record,) = parse_records(b'[{"text": "\\ud83d\\ude00"}]')
    assert record.text == "\U0001f600"


def test_caps_name_the_limit_and_the_fix(tmp_path):
    data = as_json([{"text": "x" * 30}, {"text": "y"}])
    assert problems_of(data, max_record_chars=29) == [
        "record 1: 30 characters, over the limit of 29 per record;"
        " shorten or split the record (or raise max_record_chars)"
    ]
    assert problems_of(data, max_records=1) == [
        "more than 1 records, the limit; use fewer records (or raise max_records)"
    ]
    assert problems_of(as_jsonl([{"text": "a"}] * 3), "d.jsonl", max_records=2) == [
        "more than 2 records, the limit; use fewer records (or raise max_records)"
    ]

    expected = f"the file is {len(data)} bytes, over the limit of 10 bytes; split it into smaller files (or raise max_bytes)"
    assert problems_of(data, max_bytes=10) == [expected]
    path = tmp_path / "d.json"
    path.write_bytes(data)
    with pytest.raises(DatasetError) as info:
        read_records(path, max_bytes=10)
    assert info.value.problems == [expected]


def test_the_record_cap_holds_before_a_json_list_is_decoded_whole(monkeypatch):
    """512 MiB of `{}` is ~13 GB of dicts: the items are decoded one by one and counted."""
    from finetune.data import dataset_file

    monkeypatch.setattr(dataset_file.json, "loads", lambda *a, **k: pytest.fail("decoded the whole file"))
    data = as_json([{"text": "a"}] * 5)
    assert problems_of(data, max_records=3) == [
        "more than 3 records, the limit; use fewer records (or raise max_records)"
    ]
    assert [r.text for r in parse_records(as_json([{"text": "a"}, {"text": "b"}]))] == ["a", "b"]


def test_default_size_cap_is_reported_in_mib():
    with pytest.raises(DatasetError, match=r"the file is 3\.0 MiB, over the limit of 2\.0 MiB"):
        parse_records(b" " * (3 * 2**20), max_bytes=2 * 2**20)


def test_all_problems_are_reported_together_in_file_order():
    records = [alpaca(1), {"instruction": "i"}, alpaca(3), {"instruction": "", "output": 1}, [1]]
    assert problems_of(as_json(records)) == [
        f'record 2: missing "output" {ALPACA_NEED}',
        'record 4: "instruction" is empty; fill it in or remove the record',
        'record 4: "output" must be a string, got number',
        "record 5: expected a JSON object, got list",
    ]


def test_report_lists_twenty_problems_then_counts_the_rest():
    records = [{"instruction": "i", "output": ""} for _ in range(25)]
    with pytest.raises(DatasetError) as info:
        parse_records(as_json(records), "train.json")
    report = str(info.value).splitlines()
    assert report[0] == "train.json: 25 problems:"
    assert report[1] == '  - record 1: "output" is empty; fill it in or remove the record'
    assert report[20].startswith("  - record 20:")
    assert report[21:] == ["  ... and 5 more"]
    assert len(info.value.problems) == 25


def test_dataset_error_is_a_value_error_and_pickles():
    error = DatasetError(["record 1: bad"], "d.json")
    assert isinstance(error, ValueError)
    assert str(error) == "d.json: 1 problem:\n  - record 1: bad"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.problems, copy.path, str(copy)) == (error.problems, error.path, str(error))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DatasetError, match="file not found; check the data path"):
        read_records(tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="this is a folder"):
        read_records(tmp_path)


# --- split -------------------------------------------------------------------------------------

TEXTS = [Record("text", text=str(i), number=i + 1) for i in range(100)]


@pytest.mark.parametrize(
    ("n", "val_set_size", "n_val"),
    [
        (100, 0.1, 10),
        (100, 0.0, 0),
        (10, 0.25, 2),  # round(2.5) == 2
        (2, 0.01, 1),  # a non-zero fraction keeps at least one record
        (1, 0.3, 0),  # ...unless there is only one
        (10, 1, 1),  # >= 1 is a count
        (10, 9.0, 9),
    ],
)
def test_split_sizes(n, val_set_size, n_val):
    train, val = split_records(TEXTS[:n], val_set_size, seed=0)
    assert (len(train), len(val)) == (n - n_val, n_val)


def test_split_is_a_seeded_partition_in_file_order():
    train, val = split_records(TEXTS, 0.2, seed=42)
    assert split_records(TEXTS, 0.2, seed=42) == (train, val)
    assert split_records(TEXTS, 0.2, seed=43) != (train, val)
    assert sorted(train + val, key=lambda r: r.number) == TEXTS
    assert train == sorted(train, key=lambda r: r.number)
    assert val == sorted(val, key=lambda r: r.number)
    assert all(any(r is t for t in TEXTS) for r in val)


def test_fraction_and_count_differ():
    assert len(split_records(TEXTS, 0.5, seed=0)[1]) == 50
    assert len(split_records(TEXTS, 5, seed=0)[1]) == 5


@pytest.mark.parametrize(
    ("n", "val_set_size", "message"),
    [
        (2, 0.9, "val_set_size=0.9 puts 2 of 2 records in the validation split and leaves none for training"),
        (5, 5, "val_set_size=5 puts 5 of 5 records in the validation split"),
        (5, 1.5, "val_set_size=1.5: use a fraction in [0, 1) or a whole count >= 1"),
        (5, -0.1, "val_set_size=-0.1: use a fraction"),
        (5, float("nan"), "val_set_size=nan: use a fraction"),
        (5, float("inf"), "val_set_size=inf: use a fraction"),
    ],
)
def test_split_errors_tell_what_to_change(n, val_set_size, message):
    with pytest.raises(DatasetError) as info:
        split_records(TEXTS[:n], val_set_size, seed=0)
    assert info.value.problems[0].startswith(message)


def test_split_error_suggests_lowering_val_set_size():
    with pytest.raises(DatasetError, match="lower val_set_size"):
        split_records(TEXTS[:3], 3, seed=0)


# --- fingerprint -------------------------------------------------------------------------------


def test_fingerprint_is_the_sha256_of_the_bytes():
    assert dataset_fingerprint(b"") == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    data = as_json([alpaca(1)])
    assert dataset_fingerprint(data) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert dataset_fingerprint(data) != dataset_fingerprint(data + b"\n")
