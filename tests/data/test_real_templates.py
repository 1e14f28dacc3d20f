"""Templates and masks on real tokenizers: SmolLM2 and Gemma 3 (imported), Llama 2 and Mistral (SentencePiece).

For each: tunelab's rendered prompt is, token for token, what ``tokenizer.apply_chat_template(...,
add_generation_prompt=True)`` gives, and the trained positions are exactly each assistant turn's
content plus its end-of-turn token.
"""

from __future__ import annotations

import shutil
from itertools import groupby
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from tunelab.data.templates import BUILTIN_TEMPLATES, IGNORE_INDEX, render_conversation, render_prompt, resolve_template
from tunelab.errors import DataError
from tunelab.models.load import load_tokenizer, stop_token_ids

SENTENCEPIECE = SHARED_DATA / "tokenizers" / "sentencepiece"
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris.\nIt has been the capital since 987."},
    {"role": "user", "content": "And of Japan?  Answer in one word."},
    {"role": "assistant", "content": "Tokyo (東京), naïvely spelled 'Tokio'."},
]
NO_SYSTEM = CONVERSATION[1:]

# The chat templates these models ship (string contents only), as their Hugging Face tokenizers carry them.
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_V1 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_V3 = (  # [INST] and [/INST] are control tokens of the v3 and v7 vocabularies
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
GEMMA3_IT = (  # the Gemma 3 instruct tokenizer's template (the imported base model has none)
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)


def sentencepiece_tokenizer(tmp_path: Path, file: str, template: str):
    """A real SentencePiece tokenizer (converted to a fast one) with its model's chat template."""
    from transformers import LlamaTokenizer

    shutil.copy(SENTENCEPIECE / file, tmp_path / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(tmp_path)
    tokenizer.chat_template = template
    return tokenizer


def assert_prompt_matches_hf(tokenizer, template: str, messages: list[dict]) -> None:
    """tunelab's generation prompt, tokenized, equals transformers' apply_chat_template token for token."""
    for cut in range(1, len(messages) + 1):
        if messages[cut - 1]["role"] != "user":
            continue
        prompt = messages[:cut]
        ours = tokenizer(render_prompt(tokenizer, template, prompt), add_special_tokens=False)["input_ids"]
        theirs = tokenizer.apply_chat_template(prompt, chat_template=template, add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
        assert ours == theirs


def assert_trained_exactly_assistant_turns(tokenizer, template: str, messages: list[dict], stop_ids: set[int],
                                           end_of_turn: str) -> None:
    """Each run of trained tokens decodes to one assistant turn's content followed by its end-of-turn token."""
    rendered = render_conversation(tokenizer, template, messages, "assistant", stop_ids)
    full = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True,
                                         return_dict=True)["input_ids"]
    assert rendered.input_ids == full  # no token added: the template already ends each turn with a stop token
    runs = [[token for token, _ in group]
            for trained, group in groupby(zip(rendered.input_ids, rendered.labels), key=lambda p: p[1] != IGNORE_INDEX)
            if trained]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run[-1] in stop_ids and tokenizer.convert_ids_to_tokens(run[-1]) == end_of_turn
        # Nothing of the prompt and nothing after the end-of-turn token (a space the template puts before
        # the content or the end-of-turn token belongs to the turn).
        assert tokenizer.decode(run[:-1], skip_special_tokens=False).strip() == answer.strip()


@pytest.mark.parametrize("file, template", [
    ("llama2_tokenizer.model", LLAMA2_CHAT),
    ("mistral_tokenizer.model.v1", MISTRAL_V1),
    ("mistral_mistral_instruct_tokenizer_240323.model.v3", MISTRAL_V3),
    ("mistral_mistral_instruct_tokenizer_241114.model.v7", MISTRAL_V3),
])
def test_sentencepiece_tokenizers_prompt_and_masks(tmp_path, file, template):
    tokenizer = sentencepiece_tokenizer(tmp_path, file, template)
    messages = CONVERSATION if template == LLAMA2_CHAT else NO_SYSTEM
    assert resolve_template(tokenizer, "auto") == template
    assert_prompt_matches_hf(tokenizer, template, messages)
    assert_trained_exactly_assistant_turns(tokenizer, template, messages, {tokenizer.eos_token_id}, "</s>")


@pytest.mark.real
def test_smollm2_prompt_and_masks(smollm2):
    tokenizer = load_tokenizer(str(smollm2))
    stop_ids = stop_token_ids(str(smollm2), tokenizer)
    template = resolve_template(tokenizer, "auto")
    assert template == tokenizer.chat_template and "You are a helpful AI assistant named SmolLM" in template
    for messages in (CONVERSATION, NO_SYSTEM):  # without a system message the template inserts its default one
        assert_prompt_matches_hf(tokenizer, template, messages)
        assert_trained_exactly_assistant_turns(tokenizer, template, messages, stop_ids, "<|im_end|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_ids


@pytest.mark.real
def test_gemma3_prompt_and_masks_with_its_instruct_template(gemma3):
    tokenizer = load_tokenizer(str(gemma3))
    stop_ids = stop_token_ids(str(gemma3), tokenizer)
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in stop_ids  # the import put it in the EOS list
    tokenizer.chat_template = GEMMA3_IT
    for messages in (CONVERSATION, NO_SYSTEM):
        assert_prompt_matches_hf(tokenizer, GEMMA3_IT, messages)
        assert_trained_exactly_assistant_turns(tokenizer, GEMMA3_IT, messages, stop_ids, "<end_of_turn>")
        # The built-in gemma template (data.template: gemma) renders exactly what Gemma's own does.
        assert render_prompt(tokenizer, BUILTIN_TEMPLATES["gemma"], messages[:-1]) == \
            render_prompt(tokenizer, GEMMA3_IT, messages[:-1])
        full = render_conversation(tokenizer, GEMMA3_IT, messages, "assistant", stop_ids)
        assert render_conversation(tokenizer, BUILTIN_TEMPLATES["gemma"], messages, "assistant", stop_ids) == full


@pytest.mark.real
def test_gemma3_base_without_template_gets_a_clear_choice(gemma3, tmp_path):
    from tunelab.config import DataConfig
    from tunelab.data.tokenize import prepare_data

    tokenizer = load_tokenizer(str(gemma3))
    assert not tokenizer.chat_template  # a base model
    stop_ids = stop_token_ids(str(gemma3), tokenizer)
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n')
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError) as refused:
        prepare_data(DataConfig(train=[str(chat)], cache_dir=cache), "conversations", 0, tokenizer, stop_ids)
    message = str(refused.value)
    assert "no chat template" in message and "data.template: chatml|gemma|" in message
    assert "train.objective: pretrain" in message
    # The two ways out: a named template, or continued pretraining on plain text.
    named = prepare_data(DataConfig(train=[str(chat)], template="gemma", cache_dir=cache), "conversations", 0, tokenizer,
                         stop_ids)
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in named.train[0]["labels"]
    text = tmp_path / "text.txt"
    text.write_text("Paris is the capital of France.\n")
    plain = prepare_data(DataConfig(train=[str(text)], cache_dir=cache), "text", 0, tokenizer, stop_ids)
    assert plain.template is None and plain.train_report.examples == 1
