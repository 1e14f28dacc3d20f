"""Rewards: GSM8K answers on real references, rule rewards, user functions, reward-model scoring."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from tunelab.data.templates import render_conversation
from tunelab.errors import ConfigError, DataError, TrainingError
from tunelab.models.load import stop_token_ids
from tunelab.train.rl.rewards import BUILTIN_REWARDS, combine_rewards, exact_match, format_reward, gsm8k, length_penalty, load_reward_fn
from tunelab.models.reward_scoring import RewardModelScorer

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"


def _gsm8k_records(count: int) -> list[dict]:
    with GSM8K_TEST.open() as handle:
        return [json.loads(next(handle)) for _ in range(count)]


def test_gsm8k_scores_real_references() -> None:
    records = _gsm8k_records(60)
    references = [r["answer"] for r in records]
    finals = [r["answer"].rsplit("####", 1)[1].strip() for r in records]
    prompts = [r["question"] for r in records]
    right = [f"Let me think step by step.\nThe total is {final} in the end.\nanswer: {final}" for final in finals]
    wrong = [f"Step: 1 + 1 = 2.\nanswer: {float(final.replace(',', '')) + 1:g}" for final in finals]
    assert gsm8k(prompts, right, references) == [1.0] * 60
    assert gsm8k(prompts, wrong, references) == [0.0] * 60
    # The first test record's answer is 18 ("#### 18").
    assert finals[0] == "18"
    variants = ["She makes 9 * 2 = 18 dollars.", "#### 18", "answer: $18.00", "answer: 18\n",
                "18 is wrong, answer: 17", "I do not know", "answer: 180"]
    assert gsm8k(prompts[:1] * 7, variants, references[:1] * 7) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # A bare number as the reference, thousands separators in the completion.
    assert gsm8k(["q"], ["so the answer: 1,250"], ["1250"]) == [1.0]


def test_gsm8k_and_exact_match_need_references() -> None:
    with pytest.raises(DataError, match="sample 1 has no reference"):
        gsm8k(["a", "b"], ["1", "2"], ["1", None])
    with pytest.raises(DataError, match="holds no number"):
        gsm8k(["a"], ["1"], ["no number here"])
    with pytest.raises(DataError, match="sample 0 has no reference"):
        exact_match(["a"], ["x"], ["  "])


def test_exact_match_normalises() -> None:
    completions = ["The capital is...\nanswer: Paris.", "answer:   new   YORK", "paris", "answer: Lyon"]
    references = ["paris", "New York", "Paris!", "Paris"]
    assert exact_match(["q"] * 4, completions, references) == [1.0, 1.0, 1.0, 0.0]


def test_format_reward_wants_a_final_answer_line() -> None:
    fn = BUILTIN_REWARDS["format"]
    completions = ["4 - 2 = 2\nanswer: 2", "answer: 2\n\n", "answer: 2\nbut maybe 3", "4 - 2 = 2", "answer:", ""]
    assert fn(["q"] * 6, completions, [None] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    custom = format_reward(r"^<think>.*</think>")
    assert custom(["q"] * 2, ["<think>hm</think> 4", "4"], [None, None]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="invalid regular expression"):
        format_reward("(unclosed")


def test_length_penalty_ramps_from_target_to_target_plus_buffer() -> None:
    fn = length_penalty(target=10, buffer=10)
    completions = ["x" * n for n in (0, 10, 11, 15, 19, 20, 50)]
    assert fn(["q"] * 7, completions, [None] * 7) == pytest.approx([0.0, 0.0, -0.1, -0.5, -0.9, -1.0, -1.0])
    hard = length_penalty(target=3, buffer=0, count=lambda text: len(text.split()))
    assert hard(["q"] * 2, ["one two three", "one two three four"], [None, None]) == [0.0, -1.0]
    with pytest.raises(ConfigError, match=">= 0"):
        length_penalty(-1, 5)


def test_combined_reward_weights_and_components() -> None:
    combined = combine_rewards({"gsm8k": (gsm8k, 1.0), "format": (BUILTIN_REWARDS["format"], 0.5),
                                "length": (length_penalty(12, 8), 2.0)})
    completions = ["answer: 18", "the answer is 18", "answer: 17 and some more words"]
    references = ["#### 18"] * 3
    parts = combined.components(["q"] * 3, completions, references)
    assert parts == {"gsm8k": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0], "length": [0.0, -0.5, -1.0]}
    assert combined(["q"] * 3, completions, references) == pytest.approx([1.5, 0.0, -1.5])
    assert combined.combine(parts) == combined(["q"] * 3, completions, references)
    with pytest.raises(ConfigError, match="at least one"):
        combine_rewards({})


USER_MODULE = '''
import math

def good(prompts, completions, references):
    return [float(len(c)) for c in completions]

def short(prompts, completions, references):
    return [1.0]

def words(prompts, completions, references):
    return ["high" for _ in completions]

def nan(prompts, completions, references):
    return [math.nan for _ in completions]

def as_tensor(prompts, completions, references):
    import torch
    return torch.tensor([1, 2], dtype=torch.int64)

NOT_A_FUNCTION = 3
'''


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "my_rewards_for_test.py"
    path.write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def test_load_builtin_module_and_file_functions(user_module: Path) -> None:
    assert load_reward_fn("gsm8k") is gsm8k
    by_module = load_reward_fn("my_rewards_for_test:good")
    assert by_module(["p", "p"], ["ab", "abcd"], [None, None]) == [2.0, 4.0]
    by_file = load_reward_fn(f"{user_module}:good")
    assert by_file(["p"], ["abc"], [None]) == [3.0]
    assert load_reward_fn("my_rewards_for_test:as_tensor")(["p", "p"], ["a", "b"], [None, None]) == [1.0, 2.0]


@pytest.mark.parametrize(("spec", "message"), [
    ("no_such_module_xyz:fn", "no module named 'no_such_module_xyz'.*path/to/rewards.py:function"),
    ("my_rewards_for_test:missing", "has no function 'missing' \\(it defines: as_tensor, good, nan, short, words\\)"),
    ("my_rewards_for_test:NOT_A_FUNCTION", "NOT_A_FUNCTION is a int, not a function"),
    ("gsm8", "not a built-in reward \\(exact_match, gsm8k, format\\)"),
    ("/no/such/file.py:fn", "no such file /no/such/file.py"),
])
def test_load_errors_name_the_problem(user_module: Path, spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_reward_fn(spec)


def test_import_failures_are_config_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("def f(prompts, completions, references):\n    return [\n\nx = (\n")
    with pytest.raises(ConfigError, match="broken.py, line \\d+: syntax error"):
        load_reward_fn(f"{broken}:f")
    failing = tmp_path / "failing.py"
    failing.write_text("import no_such_dependency_xyz\n")
    with pytest.raises(ConfigError, match="importing .*failing.py raised ModuleNotFoundError"):
        load_reward_fn(f"{failing}:f")


@pytest.mark.parametrize(("name", "message"), [
    ("short", "returned 1 values for 2 completions"),
    ("words", "returned 'high' for completion 0; every reward must be a finite number"),
    ("nan", "returned nan for completion 0"),
])
def test_bad_results_raise_training_errors(user_module: Path, name: str, message: str) -> None:
    fn = load_reward_fn(f"my_rewards_for_test:{name}")
    with pytest.raises(TrainingError, match=message):
        fn(["p", "p"], ["a", "b"], [None, None])


# --- reward models -------------------------------------------------------------------------------------------------

CONVERSATIONS = [
    ([{"role": "user", "content": "What is 2 + 3?"}], "2 + 3 = 5\nanswer: 5"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}], "Blue."),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "Tell me a long story about a cat and a dog who became friends."}],
     "Once upon a time a cat met a dog and they played all day."),
]


def _randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3


def _direct_scores(model: torch.nn.Module, scorer: RewardModelScorer) -> list[float]:
    """One unpadded sequence at a time through the model's own forward (its pooled logits)."""
    scores = []
    with torch.no_grad():
        for prompt, completion in CONVERSATIONS:
            ids = torch.tensor([scorer.tokenize(prompt, completion)])
            scores.append(model(input_ids=ids).logits[0, 0].item())
    return scores


@pytest.fixture(scope="module")
def full_reward_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    _randomise(model.score, 1)
    out = tmp_path_factory.mktemp("rm") / "full"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out, model.eval()


def test_full_reward_model_scores_equal_a_direct_forward(full_reward_model, tiny_model: Path) -> None:
    path, model = full_reward_model
    scorer = RewardModelScorer(path, batch_size=2)  # 3 sequences of different lengths: padded batches
    prompts = [p for p, _ in CONVERSATIONS]
    completions = [c for _, c in CONVERSATIONS]
    scores = scorer(prompts, completions)
    direct = _direct_scores(model, scorer)
    assert scores == pytest.approx(direct, abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == 3
    # Sequences are tokenized as reward training tokenizes them: the completion is the last assistant
    # turn, ended by the template's end-of-turn token (no EOS added although the directory has no
    # generation config naming <|im_end|> a stop token).
    assert 4 in scorer.stop_ids and scorer.tokenizer.convert_ids_to_tokens(4) == "<|im_end|>"
    stop_ids = stop_token_ids(str(tiny_model), scorer.tokenizer)  # what reward training uses
    for prompt, completion in CONVERSATIONS:
        messages = [*prompt, {"role": "assistant", "content": completion}]
        earlier = sum(1 for m in prompt if m["role"] == "assistant")
        training_ids = render_conversation(scorer.tokenizer, scorer.template, messages, "assistant", stop_ids,
                                           earlier).input_ids
        assert scorer.tokenize(prompt, completion) == training_ids
    assert scorer.tokenizer.decode(scorer.tokenize(*CONVERSATIONS[0])).endswith("answer: 5<|im_end|>\n")


def test_scores_are_read_where_reward_training_and_transformers_read_them(full_reward_model, tmp_path: Path) -> None:
    """Even when the pad id is the sequence's last token (pad = EOS = the template's last token).

    Reward training and transformers' pooling then both read the token before it; a scorer that
    read the last real token would score a position the model was never trained to score.
    """
    path, model = full_reward_model
    prompts = [p for p, _ in CONVERSATIONS]
    completions = [c for _, c in CONVERSATIONS]
    last_token = RewardModelScorer(path).tokenize(*CONVERSATIONS[0])[-1]
    copy = tmp_path / "pad_is_last_token"
    shutil.copytree(path, copy)
    for name in ("config.json", "tokenizer_config.json"):
        config = json.loads((copy / name).read_text())
        if name == "config.json":
            config["pad_token_id"] = last_token
        else:
            config["pad_token"] = RewardModelScorer(path).tokenizer.convert_ids_to_tokens(last_token)
        (copy / name).write_text(json.dumps(config))
    one_by_one, batched = RewardModelScorer(copy, batch_size=1), RewardModelScorer(copy, batch_size=3)
    assert batched.tokenizer.pad_token_id == last_token
    scores = batched(prompts, completions)
    assert scores == pytest.approx(one_by_one(prompts, completions), abs=1e-5)
    model.config.pad_token_id = last_token
    try:
        pooled_by_hf = _direct_scores(model, batched)
    finally:
        model.config.pad_token_id = one_by_one.tokenizer.pad_token_id
    assert scores == pytest.approx(pooled_by_hf, abs=1e-5)
    unpadded = RewardModelScorer(path)(prompts, completions)
    assert abs(scores[0] - unpadded[0]) > 1e-3  # sequence 0 ends with the pad id: read one token earlier


def test_lora_reward_adapter_scores_equal_a_direct_forward(tiny_model: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["score"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            _randomise_parameter(parameter, len(name))
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    scorer = RewardModelScorer(out, batch_size=2)
    scores = scorer([p for p, _ in CONVERSATIONS], [c for _, c in CONVERSATIONS])
    model.eval()
    assert scores == pytest.approx(_direct_scores(model, scorer), abs=1e-5)
    with model.disable_adapter():
        assert scores != pytest.approx(_direct_scores(model, scorer), abs=1e-3)  # the adapter and head matter


def _randomise_parameter(parameter: torch.nn.Parameter, seed: int) -> None:
    parameter.data = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)) * 0.3


def test_reward_model_errors(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such directory"):
        RewardModelScorer(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a reward model .*LlamaForCausalLM"):
        RewardModelScorer(tiny_model)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm_adapter = tmp_path / "lm_adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                   LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"])).save_pretrained(lm_adapter)
    with pytest.raises(ConfigError, match="task_type is .*CAUSAL_LM.*not SEQ_CLS"):
        RewardModelScorer(lm_adapter)


def test_check_accepts_numpy_like_and_bools(user_module: Path) -> None:
    from tunelab.train.rl.rewards import check_rewards

    assert check_rewards((True, 2, 0.5), 3, "x") == [1.0, 2.0, 0.5]
    with pytest.raises(TrainingError, match="returned dict"):
        check_rewards({"a": 1.0}, 1, "x")
    assert not math.isnan(check_rewards([0.0], 1, "x")[0])
