"""Chat templates and label masks: only assistant turns and their end token train."""

from __future__ import annotations

import copy
import json
import shutil
from itertools import groupby
from pathlib import Path

import pytest

from conftest import SHARED_DATA, SHAREGPT_DEMO
from tunelab.data.packing import collate_padded
from tunelab.data.records import Conversation
from tunelab.data.readers import load_records
from tunelab.data.templates import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    render_conversation,
    render_prompt,
    resolve_template,
)
from tunelab.errors import DataError
from tunelab.models.load import stop_token_ids

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5\nanswer: 5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "4 + 4 = 8\nanswer: 8"},
]


def trained_runs(tokenizer, rendered) -> list[str]:
    """Decoded text of each run of consecutive trained tokens."""
    runs = []
    for trained, pairs in groupby(zip(rendered.input_ids, rendered.labels), key=lambda p: p[1] != IGNORE_INDEX):
        if trained:
            runs.append(tokenizer.decode([t for t, _ in pairs], skip_special_tokens=False))
    return runs


def test_sharegpt_multi_turn_trains_only_assistant_turns_and_their_end_token(tokenizer, tiny_model):
    records, _ = load_records([str(SHAREGPT_DEMO)])
    record = next(r for r in records if len(r.messages) >= 6)  # a 3-exchange conversation
    stops = stop_token_ids(str(tiny_model), tokenizer)
    template = resolve_template(tokenizer, "auto")
    rendered = render_conversation(tokenizer, template, record.messages, "assistant", stops)

    expected = [m["content"] + "<|im_end|>" for m in record.messages if m["role"] == "assistant"]
    assert trained_runs(tokenizer, rendered) == expected
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Every assistant end-of-turn token is trained; the user turns' ones are not.
    trained_ends = [lab == end_of_turn for tok, lab in zip(rendered.input_ids, rendered.labels) if tok == end_of_turn]
    assert trained_ends == [m["role"] == "assistant" for m in record.messages]
    assert rendered.input_ids == tokenizer(rendered.text, add_special_tokens=False)["input_ids"]


def test_last_assistant_and_all(tokenizer, tiny_model):
    stops = stop_token_ids(str(tiny_model), tokenizer)
    template = BUILTIN_TEMPLATES["chatml"]
    last = render_conversation(tokenizer, template, CONVERSATION, "last_assistant", stops)
    assert trained_runs(tokenizer, last) == ["4 + 4 = 8\nanswer: 8<|im_end|>"]
    everything = render_conversation(tokenizer, template, CONVERSATION, "all", stops)
    assert everything.labels[0] == IGNORE_INDEX
    assert everything.labels[1:] == everything.input_ids[1:]


def test_eos_is_added_when_the_template_ends_turns_without_a_stop_token(tokenizer, tiny_model):
    # The llama3 template ends turns with <|eot_id|>, which is plain text for this tokenizer.
    stops = stop_token_ids(str(tiny_model), tokenizer)
    rendered = render_conversation(tokenizer, BUILTIN_TEMPLATES["llama3"], CONVERSATION, "assistant", stops)
    runs = trained_runs(tokenizer, rendered)
    assert runs == ["2 + 3 = 5\nanswer: 5<|eot_id|></s>", "4 + 4 = 8\nanswer: 8<|eot_id|></s>"]


def test_pad_equal_to_eos_still_trains_eos(tokenizer, tiny_model):
    same = copy.deepcopy(tokenizer)
    same.pad_token = same.eos_token
    assert same.pad_token_id == same.eos_token_id
    stops = stop_token_ids(str(tiny_model), same)
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    examples = []
    for messages in (short, CONVERSATION):
        rendered = render_conversation(same, BUILTIN_TEMPLATES["plain"], messages, "assistant", stops)
        examples.append({"input_ids": rendered.input_ids, "labels": rendered.labels})
    batch = collate_padded(examples, pad_id=same.pad_token_id)
    eos = same.eos_token_id
    # The short row is padded with EOS ids, yet exactly its real EOS is a target.
    assert (batch.input_ids[0] == eos).sum() > 1
    assert int((batch.targets[0] == eos).sum()) == 1
    assert int((batch.targets[1] == eos).sum()) == 2  # one per assistant turn


def test_builtin_templates_render_prompts_for_generation(tokenizer):
    prompt = render_prompt(tokenizer, BUILTIN_TEMPLATES["chatml"], CONVERSATION[:2])
    assert prompt.endswith("<|im_start|>assistant\n")
    alpaca = render_prompt(tokenizer, BUILTIN_TEMPLATES["alpaca"], CONVERSATION[:2])
    assert alpaca.startswith("Be brief.") and alpaca.endswith("### Response:\n")


def test_template_choice(tokenizer):
    assert resolve_template(tokenizer, "auto") == tokenizer.chat_template
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    # No template: training names the choices (a built-in or pretraining); inference may fall back.
    for name in ("auto", "tokenizer"):
        with pytest.raises(DataError, match="no chat template .* data.template: chatml|gemma|.*train.objective: pretrain"):
            resolve_template(bare, name)
    assert resolve_template(bare, "auto", fallback="chatml") == BUILTIN_TEMPLATES["chatml"]
    assert resolve_template(bare, "gemma") == BUILTIN_TEMPLATES["gemma"]


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer, tiny_model):
    # A template that renders the number of messages first cannot be cut into turns.
    odd = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    with pytest.raises(DataError, match="differently when cut"):
        render_conversation(tokenizer, odd, CONVERSATION, "assistant", stop_token_ids(str(tiny_model), tokenizer))


def test_real_llama2_tokenizer_masks(tmp_path: Path):
    """A real SentencePiece tokenizer (Llama 2): offsets and masks hold with '▁' pieces and byte tokens."""
    from transformers import LlamaTokenizer

    shutil.copy(SHARED_DATA / "tokenizers" / "sentencepiece" / "llama2_tokenizer.model", tmp_path / "tokenizer.model")
    llama = LlamaTokenizer.from_pretrained(tmp_path)
    stops = {llama.eos_token_id}
    # EOS is inserted after each assistant turn unless the template already ends it with </s>.
    for name, inserted_eos in (("chatml", 2), ("alpaca", 0), ("llama3", 2)):
        rendered = render_conversation(llama, BUILTIN_TEMPLATES[name], CONVERSATION, "assistant", stops)
        runs = trained_runs(llama, rendered)
        assert len(runs) == 2, name
        for run, answer in zip(runs, ("answer: 5", "answer: 8")):
            assert answer in run and run.endswith("</s>"), (name, run)
            assert "What is" not in run and "And 4" not in run
        # What trains is what generation sees: the rendered text, tokenized once.
        ids = llama(rendered.text, add_special_tokens=False)["input_ids"]
        assert len(rendered.input_ids) - len(ids) == inserted_eos, name


def test_conversation_record_round_trip(tmp_path: Path, tokenizer, tiny_model):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    records, report = load_records([str(path)])
    assert isinstance(records[0], Conversation) and report.kept == 1
    rendered = render_conversation(tokenizer, resolve_template(tokenizer, "auto"), records[0].messages, "assistant",
                                   stop_token_ids(str(tiny_model), tokenizer))
    assert trained_runs(tokenizer, rendered) == ["2 + 3 = 5\nanswer: 5<|im_end|>", "4 + 4 = 8\nanswer: 8<|im_end|>"]
