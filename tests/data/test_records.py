"""Data readers: every format from every file type, auto detection, limits, system prompts, real files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import ALPACA_DEMO, SHAREGPT_DEMO, SHARED_DATA
from tunelab.data.files import read_rows
from tunelab.data.records import Conversation, LoadReport, Text, detect_format, to_record
from tunelab.data.readers import load_prompts, load_records
from tunelab.errors import DataError

C4_DEMO = SHARED_DATA / "llamafactory_demo" / "c4_demo.jsonl"
WIKI_DEMO = SHARED_DATA / "llamafactory_demo" / "wiki_demo.txt"


# --- writers ------------------------------------------------------------------------------------


def write_json(path: Path, rows: list[Any]) -> Path:
    """A pretty-printed JSON array (one key per line, like most published datasets)."""
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_txt(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    return path


WRITERS = {"json": write_json, "jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet, "txt": write_txt}


def messages(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


# --- one sample per format, with the canonical records it must become ---------------------------

ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]
ALPACA_RECORDS = [
    messages(("user", "Add the numbers.\n\n2 and 3"), ("assistant", "5")),
    messages(("user", "Say hi."), ("assistant", "Hi!")),
]

SHAREGPT_ROWS = [
    {
        "system": "You are terse.",
        "conversations": [
            {"from": "human", "value": "What is the weather in Paris?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "21 degrees."},
        ],
    },
    {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there"}]},
]
SHAREGPT_RECORDS = [
    messages(
        ("system", "You are terse."),
        ("user", "What is the weather in Paris?"),
        ("assistant", '{"name": "weather", "arguments": {"city": "Paris"}}'),
        ("tool", '{"temp": 21}'),
        ("assistant", "21 degrees."),
    ),
    messages(("user", "Hello"), ("assistant", "Hi there")),
]

MESSAGES_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "friend."}]},
            {"role": "assistant", "content": "Hello!"},
        ]
    },
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]},
]
MESSAGES_RECORDS = [
    messages(("system", "Be kind."), ("user", "Hello, friend."), ("assistant", "Hello!")),
    messages(("user", "2+2?"), ("assistant", "4")),
]

TEXT_ROWS = [{"text": "The first document."}, {"text": "The second, with a comma."}]
TEXT_RECORDS = ["The first document.", "The second, with a comma."]

SAMPLES = {
    "alpaca": (ALPACA_ROWS, ALPACA_RECORDS),
    "sharegpt": (SHAREGPT_ROWS, SHAREGPT_RECORDS),
    "messages": (MESSAGES_ROWS, MESSAGES_RECORDS),
    "text": (TEXT_ROWS, TEXT_RECORDS),
}

# Which file types can hold which format (CSV cells are flat strings; TXT is one text per line).
CASES = [
    *[(fmt, ext) for fmt in ("alpaca", "sharegpt", "messages", "text") for ext in ("json", "jsonl", "parquet")],
    ("alpaca", "csv"),
    ("text", "csv"),
    ("text", "txt"),
]


def write_sample(tmp_path: Path, fmt: str, ext: str) -> Path:
    rows, expected = SAMPLES[fmt]
    if ext == "txt":
        rows = [row["text"] for row in rows]
    if (fmt, ext) == ("messages", "parquet"):  # an Arrow column cannot mix text and lists of parts
        rows = [{"messages": conversation} for conversation in expected]
    return WRITERS[ext](tmp_path / f"{fmt}.{ext}", rows)


def record_values(records: list) -> list:
    return [r.text if isinstance(r, Text) else r.messages for r in records]


@pytest.mark.parametrize(("fmt", "ext"), CASES)
def test_auto_detects_each_format_in_each_file_type(tmp_path: Path, fmt: str, ext: str) -> None:
    path = write_sample(tmp_path, fmt, ext)
    records, report = load_records([str(path)])
    expected_type = Text if fmt == "text" else Conversation
    assert all(isinstance(r, expected_type) for r in records)
    assert record_values(records) == SAMPLES[fmt][1]
    assert (report.read, report.kept, dict(report.skipped)) == (2, 2, {})
    assert records[0].source.startswith(f"{path}:")
    assert detect_format(next(read_rows(str(path))).data, "x") == fmt


@pytest.mark.parametrize(("fmt", "ext"), CASES)
def test_explicit_format_reads_the_same(tmp_path: Path, fmt: str, ext: str) -> None:
    path = write_sample(tmp_path, fmt, ext)
    records, _ = load_records([str(path)], fmt=fmt)
    assert record_values(records) == SAMPLES[fmt][1]


def test_sources_name_file_and_line(tmp_path: Path) -> None:
    json_file = write_json(tmp_path / "a.json", ALPACA_ROWS)  # indent=2: each object takes 5 lines after "["
    jsonl_file = tmp_path / "b.jsonl"
    jsonl_file.write_text("\n" + json.dumps(TEXT_ROWS[0]) + "\n\n" + json.dumps(TEXT_ROWS[1]) + "\n")
    csv_file = write_csv(tmp_path / "c.csv", TEXT_ROWS)
    parquet_file = write_parquet(tmp_path / "d.parquet", TEXT_ROWS)
    txt_file = tmp_path / "e.txt"
    txt_file.write_text("one\n\n  \ntwo\n")

    assert [r.source for r in load_records([str(json_file)])[0]] == [f"{json_file}:2", f"{json_file}:7"]
    assert [r.source for r in load_records([str(jsonl_file)])[0]] == [f"{jsonl_file}:2", f"{jsonl_file}:4"]
    assert [r.source for r in load_records([str(csv_file)])[0]] == [f"{csv_file}:2", f"{csv_file}:3"]
    assert [r.source for r in load_records([str(parquet_file)])[0]] == [f"{parquet_file}:row 1", f"{parquet_file}:row 2"]
    txt_records = load_records([str(txt_file)])[0]
    assert [(r.text, r.source) for r in txt_records] == [("one", f"{txt_file}:1"), ("two", f"{txt_file}:4")]


def test_csv_quoted_multiline_field_keeps_its_start_line(tmp_path: Path) -> None:
    path = tmp_path / "multi.csv"
    path.write_text('instruction,output\n"Write two lines.","first\nsecond"\nSay hi.,Hi!\n')
    records, _ = load_records([str(path)])
    assert records[0].messages == messages(("user", "Write two lines."), ("assistant", "first\nsecond"))
    assert [r.source for r in records] == [f"{path}:2", f"{path}:4"]


def test_crlf_line_ends_do_not_leak_into_records(tmp_path: Path) -> None:
    txt = tmp_path / "win.txt"
    txt.write_bytes(b"first line\r\nsecond line\r\n")
    jsonl = tmp_path / "win.jsonl"
    jsonl.write_bytes(b'{"text": "a"}\r\n{"text": "b"}\r\n')
    csv_file = tmp_path / "win.csv"
    csv_file.write_bytes(b"instruction,output\r\nSay hi.,Hi!\r\n")
    assert record_values(load_records([str(txt)])[0]) == ["first line", "second line"]
    assert record_values(load_records([str(jsonl)])[0]) == ["a", "b"]
    assert record_values(load_records([str(csv_file)])[0]) == [messages(("user", "Say hi."), ("assistant", "Hi!"))]


def test_utf8_bom_and_non_ascii_text(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + json.dumps({"text": "Grüße, 世界"}, ensure_ascii=False).encode() + b"\n")
    records, _ = load_records([str(path)])
    assert records[0].text == "Grüße, 世界"


# --- alpaca -------------------------------------------------------------------------------------


def test_alpaca_system_and_history(tmp_path: Path) -> None:
    row = {
        "system": "You are a calculator.",
        "history": [["1+1?", "2"], ["2+2?", "4"]],
        "instruction": "3+3?",
        "input": "",
        "output": "6",
    }
    records, _ = load_records([str(write_jsonl(tmp_path / "a.jsonl", [row]))])
    assert records[0].messages == messages(
        ("system", "You are a calculator."),
        ("user", "1+1?"), ("assistant", "2"),
        ("user", "2+2?"), ("assistant", "4"),
        ("user", "3+3?"), ("assistant", "6"),
    )


def test_alpaca_input_without_instruction(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"input": "Translate: chat", "output": "cat"}])
    records, _ = load_records([str(path)])
    assert records[0].messages == messages(("user", "Translate: chat"), ("assistant", "cat"))


def test_alpaca_csv_empty_cells_are_empty_fields(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", [{"instruction": "Say hi.", "input": "", "output": "Hi!", "system": ""}])
    records, _ = load_records([str(path)])
    assert records[0].messages == messages(("user", "Say hi."), ("assistant", "Hi!"))


def test_alpaca_parquet_nulls_and_history(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Q1", "input": None, "output": "A1", "history": None},
        {"instruction": "Q2", "input": "ctx", "output": "A2", "history": [["h-q", "h-a"]]},
    ]
    records, _ = load_records([str(write_parquet(tmp_path / "a.parquet", rows))])
    assert record_values(records) == [
        messages(("user", "Q1"), ("assistant", "A1")),
        messages(("user", "h-q"), ("assistant", "h-a"), ("user", "Q2\n\nctx"), ("assistant", "A2")),
    ]


def test_alpaca_history_must_be_pairs(tmp_path: Path) -> None:
    for history in (5, [["only one"]], "text"):
        path = write_jsonl(tmp_path / "h.jsonl", [{"instruction": "q", "output": "a", "history": history}])
        with pytest.raises(DataError, match=r"h\.jsonl:1: 'history' must be a list of \[user, assistant\] pairs"):
            load_records([str(path)])


# --- sharegpt / messages ------------------------------------------------------------------------


def test_sharegpt_role_content_aliases_and_system_turn(tmp_path: Path) -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "Sys."},
            {"role": "user", "content": "Hi"},
            {"from": "GPT", "value": "Hello"},
        ]
    }
    records, _ = load_records([str(write_json(tmp_path / "s.json", [row]))])
    assert records[0].messages == messages(("system", "Sys."), ("user", "Hi"), ("assistant", "Hello"))


def test_messages_tool_role(tmp_path: Path) -> None:
    row = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "calling weather()"},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    records, _ = load_records([str(write_jsonl(tmp_path / "m.jsonl", [row]))])
    assert [m["role"] for m in records[0].messages] == ["user", "assistant", "tool", "assistant"]


def test_messages_non_text_part_is_an_error(tmp_path: Path) -> None:
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
            {"role": "assistant", "content": "A cat."},
        ]
    }
    with pytest.raises(DataError, match=r"m\.jsonl:1: 'content' holds a non-text part"):
        load_records([str(write_jsonl(tmp_path / "m.jsonl", [row]))])


def test_messages_unknown_role(tmp_path: Path) -> None:
    row = {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError, match=r"m\.jsonl:1: unknown role 'narrator'"):
        load_records([str(write_jsonl(tmp_path / "m.jsonl", [row]))])


# --- text ---------------------------------------------------------------------------------------


def test_text_field_option(tmp_path: Path) -> None:
    rows = [{"body": "doc one", "id": 1}, {"body": "doc two", "id": 2}]
    jsonl = write_jsonl(tmp_path / "t.jsonl", rows)
    csv_file = write_csv(tmp_path / "t.csv", [{"body": r["body"], "id": str(r["id"])} for r in rows])
    parquet = write_parquet(tmp_path / "t.parquet", rows)
    for path in (jsonl, csv_file, parquet):
        records, _ = load_records([str(path)], fmt="text", text_field="body")
        assert record_values(records) == ["doc one", "doc two"]
    with pytest.raises(DataError, match=r"t\.jsonl:1: record has no 'text' field"):
        load_records([str(jsonl)], fmt="text")


def test_text_format_rejects_non_text_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [42])
    with pytest.raises(DataError, match=r"t\.jsonl:1: expected a string or an object with a 'text' field, got int"):
        load_records([str(path)], fmt="text")


def test_jsonl_of_plain_strings_is_text(tmp_path: Path) -> None:
    records, _ = load_records([str(write_jsonl(tmp_path / "s.jsonl", ["alpha", "beta"]))])
    assert record_values(records) == ["alpha", "beta"]


# --- format selection ---------------------------------------------------------------------------


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "both.jsonl", [{"instruction": "Q", "output": "A", "text": "raw text"}])
    auto, _ = load_records([str(path)])
    assert auto[0].messages == messages(("user", "Q"), ("assistant", "A"))
    text, _ = load_records([str(path)], fmt="text")
    assert text[0].text == "raw text"


def test_explicit_format_that_does_not_fit(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    with pytest.raises(DataError, match=r"a\.jsonl:1: 'conversations' must be a list"):
        load_records([str(path)], fmt="sharegpt")
    with pytest.raises(DataError, match=r"a\.jsonl:1: 'messages' must be a list"):
        load_records([str(path)], fmt="messages")


def test_detection_is_per_file(tmp_path: Path) -> None:
    alpaca = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    sharegpt = write_json(tmp_path / "s.json", SHAREGPT_ROWS)
    records, report = load_records([str(alpaca), str(sharegpt)])
    assert record_values(records) == ALPACA_RECORDS + SHAREGPT_RECORDS
    assert (report.read, report.kept) == (4, 4)


def test_undetectable_record_lists_its_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"u\.jsonl:1: cannot detect the data format from keys \['completion', 'prompt'\]"):
        load_records([str(path)])


def test_single_json_object_file_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"data": ALPACA_ROWS}, indent=2))
    with pytest.raises(DataError, match=r"one\.json:1: the file is one JSON object \(keys \['data'\]\)"):
        load_records([str(path)])


# --- limit and system prompt --------------------------------------------------------------------


def test_limit_stops_after_n_records(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "1.jsonl", [{"text": f"a{i}"} for i in range(3)])
    second = write_jsonl(tmp_path / "2.jsonl", [{"text": f"b{i}"} for i in range(3)])
    records, report = load_records([str(first), str(second)], limit=2)
    assert record_values(records) == ["a0", "a1"]
    assert (report.read, report.kept) == (2, 2)
    records, report = load_records([str(first), str(second)], limit=4)
    assert record_values(records) == ["a0", "a1", "a2", "b0"]
    assert (report.read, report.kept) == (4, 4)


def test_limit_counts_kept_records_not_skipped_ones(tmp_path: Path) -> None:
    rows = [{"instruction": "q0", "output": "a0"}, {"instruction": "bad"}, {"instruction": "q2", "output": "a2"}]
    records, report = load_records([str(write_jsonl(tmp_path / "a.jsonl", rows))], on_error="skip", limit=2)
    assert [r.messages[0]["content"] for r in records] == ["q0", "q2"]
    assert (report.read, report.kept, sum(report.skipped.values())) == (3, 2, 1)


def test_system_prompt_added_only_where_missing(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
    ]
    records, _ = load_records([str(write_jsonl(tmp_path / "m.jsonl", rows))], system_prompt="Be brief.")
    assert records[0].messages == messages(("system", "Be brief."), ("user", "u"), ("assistant", "a"))
    assert records[1].messages[0] == {"role": "system", "content": "own"}
    assert len(records[1].messages) == 3

    alpaca, _ = load_records([str(write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS))], system_prompt="Be brief.")
    assert all(r.messages[0] == {"role": "system", "content": "Be brief."} for r in alpaca)
    sharegpt, _ = load_records([str(write_json(tmp_path / "s.json", SHAREGPT_ROWS))], system_prompt="Be brief.")
    assert sharegpt[0].messages[0] == {"role": "system", "content": "You are terse."}
    assert sharegpt[1].messages[0] == {"role": "system", "content": "Be brief."}
    text, _ = load_records([str(write_jsonl(tmp_path / "t.jsonl", TEXT_ROWS))], system_prompt="Be brief.")
    assert record_values(text) == TEXT_RECORDS


def test_system_prompt_with_empty_conversation_is_a_data_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "e.jsonl", [{"messages": []}])
    with pytest.raises(DataError, match=r"e\.jsonl:1: conversation has no messages"):
        load_records([str(path)], system_prompt="Be brief.")
    path = write_jsonl(tmp_path / "e.jsonl", [{"conversations": []}])
    with pytest.raises(DataError, match=r"e\.jsonl:1: conversation has no messages"):
        load_records([str(path)], system_prompt="Be brief.")


def test_to_record_sets_source(tmp_path: Path) -> None:
    row = next(read_rows(str(write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS))))
    record = to_record(row, "alpaca")
    assert record.source == f"{tmp_path / 'a.jsonl'}:1"


def test_load_report_summary() -> None:
    report = LoadReport()
    report.skip("record has no 'output' field", "a.json:7")
    report.skip("conversation has no assistant message", "a.json:9")
    report.skip("record has no 'output' field", "a.json:12")
    assert report.skipped == {"record has no 'output' field": 2, "conversation has no assistant message": 1}
    assert report.summary() == (
        "2 skipped: record has no 'output' field (first at a.json:7)\n"
        "1 skipped: conversation has no assistant message (first at a.json:9)"
    )
    assert LoadReport().summary() == ""


# --- the real demo files ------------------------------------------------------------------------

needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is not on this machine")


@needs_shared_data
def test_real_alpaca_demo() -> None:
    records, report = load_records([str(ALPACA_DEMO)])
    assert len(records) == 999
    assert (report.read, report.kept, dict(report.skipped)) == (999, 999, {})
    first = records[0]
    assert first.source == f"{ALPACA_DEMO}:2"
    assert [m["role"] for m in first.messages] == ["user", "assistant"]
    assert first.messages[0]["content"] == "Describe a process of making crepes."
    assert first.messages[1]["content"].startswith("Making crepes is an easy and delicious process!")
    # The first record with an input: instruction and input joined by a blank line.
    sixth = records[5]
    assert sixth.source == f"{ALPACA_DEMO}:27"
    assert sixth.messages[0]["content"] == (
        "Given the parameters of a triangle, find out its perimeter.\n\nSide 1 = 4\nSide 2 = 6\nSide 3 = 8"
    )
    assert records[-1].source == f"{ALPACA_DEMO}:4992"


@needs_shared_data
def test_real_sharegpt_demo() -> None:
    records, _ = load_records([str(SHAREGPT_DEMO)])
    assert len(records) == 500
    assert records[0].source == f"{SHAREGPT_DEMO}:2"
    assert records[0].messages == messages(
        ("user", "Who are you?"),
        ("assistant", "I am Vicuna, a language model trained by researchers from Large Model Systems "
                      "Organization (LMSYS)."),
        ("user", "Have a nice day!"),
        ("assistant", "You too!"),
    )
    assert records[-1].messages[0] == {"role": "user", "content": "Are you created by Meta?"}
    limited, report = load_records([str(SHAREGPT_DEMO)], fmt="sharegpt", limit=10)
    assert len(limited) == 10 and report.read == 10
    assert limited[0].messages == records[0].messages


@needs_shared_data
def test_real_pretraining_text_demos() -> None:
    c4, _ = load_records([str(C4_DEMO)])
    assert len(c4) == 300 and all(isinstance(r, Text) for r in c4)
    assert c4[0].source == f"{C4_DEMO}:1"
    assert c4[0].text.startswith("Don’t think you need all the bells and whistles? No problem.")
    assert c4[-1].source == f"{C4_DEMO}:300"

    wiki, _ = load_records([str(WIKI_DEMO)])
    assert len(wiki) == 30 and all(isinstance(r, Text) for r in wiki)
    assert wiki[0].source == f"{WIKI_DEMO}:1"
    assert wiki[0].text.startswith("Anarchism is a political philosophy and movement")
    assert wiki[1].text.startswith("Autism is a neurodevelopmental disorder")
    assert not any(r.text != r.text.strip("\r\n") for r in wiki)


def test_question_answer_records_gsm8k(tmp_path: Path) -> None:
    gsm8k = SHARED_DATA / "gsm8k" / "test.jsonl"
    if not gsm8k.is_file():
        pytest.skip("shared data not available")
    records, report = load_records([str(gsm8k)], limit=5)
    first = json.loads(gsm8k.read_text().splitlines()[0])
    assert [m["role"] for m in records[0].messages] == ["user", "assistant"]
    assert records[0].messages[0]["content"] == first["question"]
    assert records[0].messages[1]["content"] == first["answer"] and "####" in first["answer"]
    prompts, _ = load_prompts([str(gsm8k)], limit=5)
    assert prompts[0].messages == [{"role": "user", "content": first["question"]}]
    assert prompts[0].reference == first["answer"] and prompts[0].source == f"{gsm8k}:1"


def test_prompts_take_the_final_assistant_turn_as_reference(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "No answer yet"}]},
        {"instruction": "Add 1 and 2."},
        {"instruction": "Add 2 and 2.", "output": "4"},
        {"messages": [{"role": "assistant", "content": "only me"}]},
    ])
    prompts, report = load_prompts([str(path)], fmt="auto")
    assert [p.reference for p in prompts] == ["Hello", None]
    # Detection is per file from its first record (messages), so the alpaca rows are bad records here.
    assert report.kept == 2 and sum(report.skipped.values()) == 3
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add 1 and 2."}, {"instruction": "Add 2 and 2.", "output": "4"}])
    prompts, _ = load_prompts([str(alpaca)])
    assert [(p.messages[-1]["content"], p.reference) for p in prompts] == [("Add 1 and 2.", None), ("Add 2 and 2.", "4")]
    with pytest.raises(DataError, match="prompt has no user message"):
        load_prompts([str(write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}]))],
                     on_error="fail")
