"""GGUF export: every tensor and the tokenizer read back equal to the HF model; Q/K permutation; refusals.

Without llama.cpp here, the file's meaning is checked by a numpy forward pass that follows
llama.cpp's graphs (tests/support/gguf_reference.py) on the tensors read from the file, against
transformers' logits; and by tokenizing with llama.cpp's BPE algorithm. The other families
(Mistral, Qwen2, Qwen3, Gemma 3) are tested in test_tiny_archs.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from conftest import SHARED_DATA
from gguf_reference import gguf_logits as _gguf_logits
from tunelab.deploy import gguf as gguf_export
from tunelab.deploy.gguf import (
    check_with_llama_cpp,
    export_gguf,
    gguf_bpe_tokenize,
    llama3_rope_factors,
    permute_qk,
    read_gguf,
    unpermute_qk,
    verify_gguf,
)
from tunelab.errors import TunelabError

gguf = pytest.importorskip("gguf")

PROMPT_IDS = [0, 3, 17, 99, 230, 5, 31, 8, 4, 120, 64, 7]


@pytest.fixture(scope="module")
def exported(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model exported once per outtype."""
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(tiny_model, out / f"tiny-{t}.gguf", outtype=t) for t in ("f32", "f16", "q8_0")}


def _hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


# ---------------------------------------------------------------------------------------------
# Q/K permutation


def test_permutation_matches_llama_cpp_definition_on_a_hand_checked_example():
    # llama.cpp (convert_hf_to_gguf.py, LlamaModel.permute): reshape(n_head, 2, rows/n_head/2, ...),
    # swap axes 1 and 2, reshape back. Per head of size 8: [0..7] -> [0 4 1 5 2 6 3 7].
    rows = np.arange(16, dtype=np.float32)
    assert permute_qk(rows, n_head=2).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert permute_qk(np.arange(4)[:, None] * np.ones((1, 3)), n_head=1)[:, 0].tolist() == [0, 2, 1, 3]
    assert unpermute_qk(np.array([0, 4, 1, 5, 2, 6, 3, 7]), n_head=1).tolist() == list(range(8))


def test_permutation_round_trips():
    rng = np.random.default_rng(0)
    for n_head, head_dim, cols in [(4, 16, 64), (2, 16, 64), (8, 128, 3), (1, 2, 5)]:
        weight = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
        bias = rng.standard_normal(n_head * head_dim).astype(np.float32)
        for tensor in (weight, bias):
            assert np.array_equal(unpermute_qk(permute_qk(tensor, n_head), n_head), tensor)
            assert np.array_equal(permute_qk(unpermute_qk(tensor, n_head), n_head), tensor)
        assert not np.array_equal(permute_qk(weight, n_head), weight) or head_dim == 2
    with pytest.raises(ValueError):
        permute_qk(np.zeros((6, 2)), n_head=2)  # heads of odd size cannot be paired


def test_permuted_weights_under_adjacent_pair_rope_give_hf_attention_scores():
    """The point of the permutation: HF's half-split RoPE on HF rows == llama.cpp's pair RoPE on permuted rows."""
    rng = np.random.default_rng(1)
    n_head, head_dim, hidden, T = 2, 8, 16, 5
    wq, wk = rng.standard_normal((2, n_head * head_dim, hidden))
    x = rng.standard_normal((T, hidden))
    inv = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    angle = np.arange(T)[:, None, None] * inv  # [T, 1, head_dim/2]

    def hf_rope(v):  # rotate_half: dimension i pairs with i + head_dim/2
        a, b = v[..., : head_dim // 2], v[..., head_dim // 2:]
        return np.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], -1)

    def pair_rope(v):  # llama.cpp: dimension 2i pairs with 2i + 1
        out = np.empty_like(v)
        out[..., 0::2] = v[..., 0::2] * np.cos(angle) - v[..., 1::2] * np.sin(angle)
        out[..., 1::2] = v[..., 0::2] * np.sin(angle) + v[..., 1::2] * np.cos(angle)
        return out

    def scores(q, k):
        return np.einsum("qhd,khd->hqk", q, k)

    hf = scores(hf_rope((x @ wq.T).reshape(T, n_head, head_dim)), hf_rope((x @ wk.T).reshape(T, n_head, head_dim)))
    cpp = scores(pair_rope((x @ permute_qk(wq, n_head).T).reshape(T, n_head, head_dim)),
                 pair_rope((x @ permute_qk(wk, n_head).T).reshape(T, n_head, head_dim)))
    unpermuted = scores(pair_rope((x @ wq.T).reshape(T, n_head, head_dim)),
                        pair_rope((x @ wk.T).reshape(T, n_head, head_dim)))
    assert np.allclose(cpp, hf, atol=1e-10)
    assert not np.allclose(unpermuted, hf, atol=1e-3)


def test_llama3_rope_factors_reproduce_transformers_frequencies():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = 128
    plain = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = llama3_rope_factors(config.to_dict())
    assert factors is not None and factors.shape == (head_dim // 2,)
    assert {1.0, 8.0} <= set(factors.tolist()) and len(set(factors.tolist())) > 2  # kept, scaled and blended
    assert np.allclose(factors, (plain / scaled.double()).numpy(), rtol=1e-5)
    assert llama3_rope_factors(LlamaConfig().to_dict()) is None


def test_llama3_rope_model_exports_rope_freqs(tmp_path, tiny_model):
    model_dir = tmp_path / "llama31"
    shutil.copytree(tiny_model, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (model_dir / "config.json").write_text(json.dumps(config))
    path = export_gguf(model_dir, tmp_path / "llama31.gguf", outtype="f32")
    tensors = {t["name"]: t for t in read_gguf(path)["tensors"]}
    assert tensors["rope_freqs.weight"]["shape"] == [8] and tensors["rope_freqs.weight"]["type"] == "F32"
    verify_gguf(model_dir, path)
    ids = PROMPT_IDS * 8  # long enough for the scaled low frequencies to matter
    expected = _hf_logits(model_dir, ids)
    assert np.abs(_gguf_logits(path, ids) - expected).max() < 1e-5 * np.abs(expected).max()


# ---------------------------------------------------------------------------------------------
# Export and read back


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_export_reads_back_equal_to_the_hf_model(exported, tiny_model, outtype):
    path = exported[outtype]
    summary = verify_gguf(tiny_model, path)  # raises on any mismatch
    matrices = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[outtype]
    n_layers = 2
    assert summary["n_tensors"] == 3 + 9 * n_layers  # token_embd, output_norm, output + 9 per block
    assert summary["tensor_types"] == ({"F32": 21} if outtype == "f32" else {matrices: 16, "F32": 5})
    assert summary["q8_0_fallbacks"] == []
    bound = {"f32": 0.0, "f16": 1e-4, "q8_0": 1e-3}[outtype]  # weights are ~N(0, 0.02)
    assert summary["max_abs_error"][matrices] <= bound and summary["max_abs_error"]["F32"] == 0.0
    if outtype != "f32":
        assert summary["max_abs_error"][matrices] > 0

    info = read_gguf(path)
    meta = info["metadata"]
    config = json.loads((tiny_model / "config.json").read_text())
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[outtype]
    assert meta["llama.context_length"] == config["max_position_embeddings"] == 2048
    assert meta["llama.embedding_length"] == 64 and meta["llama.block_count"] == 2
    assert meta["llama.feed_forward_length"] == config["intermediate_size"] == 192
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.rope.freq_base"] == 10000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)
    assert meta["llama.vocab_size"] == config["vocab_size"] == 960
    tensors = {t["name"]: t for t in info["tensors"]}
    assert tensors["blk.0.attn_k.weight"]["shape"] == [32, 64]  # numpy order: [out, in]
    assert tensors["blk.1.ffn_down.weight"]["shape"] == [64, 192]
    assert tensors["blk.0.attn_norm.weight"]["type"] == tensors["output_norm.weight"]["type"] == "F32"
    assert tensors["token_embd.weight"]["type"] == tensors["output.weight"]["type"] == matrices


def test_gguf_tensors_compute_the_hf_logits(exported, tiny_model):
    """A forward pass with llama.cpp's semantics over the file's tensors gives transformers' logits."""
    expected = _hf_logits(tiny_model, PROMPT_IDS)
    scale = np.abs(expected).max()
    errors = {t: np.abs(_gguf_logits(path, PROMPT_IDS) - expected).max() / scale for t, path in exported.items()}
    assert errors["f32"] < 1e-5
    assert errors["f16"] < 1e-3
    assert errors["q8_0"] < 2e-2
    assert np.array_equal(_gguf_logits(exported["f16"], PROMPT_IDS).argmax(-1), expected.argmax(-1))


def test_tokenizer_metadata(exported, tiny_model):
    meta = read_gguf(exported["f16"])["metadata"]
    hf = AutoTokenizer.from_pretrained(tiny_model)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    # The tiny tokenizer splits every digit before the GPT-2 byte-level regex: llama.cpp's "starcoder" preset.
    assert meta["tokenizer.ggml.pre"] == "starcoder"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 960 and len(hf) == 914
    assert tokens[:914] == hf.convert_ids_to_tokens(list(range(914)))
    assert tokens[914:] == [f"[PAD{i}]" for i in range(914, 960)] and set(types[914:]) == {5}  # UNUSED
    special = {hf.convert_tokens_to_ids(t) for t in ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]}
    assert {i for i, t in enumerate(types) if t == 3} == special  # CONTROL
    assert set(types[i] for i in range(914) if i not in special) == {1}  # NORMAL
    merges = json.loads((tiny_model / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert meta["tokenizer.ggml.bos_token_id"] == hf.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == hf.eos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == hf.pad_token_id
    assert meta["tokenizer.ggml.eot_token_id"] == hf.convert_tokens_to_ids("<|im_end|>")  # end of turn stops
    stops = json.loads((tiny_model / "generation_config.json").read_text())["eos_token_id"]
    assert set(stops) == {meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"]}
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == hf.chat_template and "<|im_start|>" in meta["tokenizer.chat_template"]


def test_llama_cpp_style_tokenization_equals_hf_and_the_preset_matters(exported, tiny_model):
    meta = read_gguf(exported["f32"])["metadata"]
    hf = AutoTokenizer.from_pretrained(tiny_model)
    chat = hf.apply_chat_template([{"role": "user", "content": "Add 17 and 25."},
                                   {"role": "assistant", "content": "17 + 25 = 42"}], tokenize=False)
    texts = ["a  1 and b   22, 3.14159", "x2y 1000000 digits 9876543210", chat]
    for text in texts:
        assert gguf_bpe_tokenize(text, meta) == hf.encode(text, add_special_tokens=False), text
    # GPT-2's preset keeps a space with the digits after it ("a", " ", " 1"), so "a  1" loses the "ĠĠ" merge.
    gpt2_preset = dict(meta, **{"tokenizer.ggml.pre": "gpt-2"})
    assert gguf_bpe_tokenize("a  1", gpt2_preset) != hf.encode("a  1", add_special_tokens=False)


def test_file_sizes_shrink_with_the_outtype(exported):
    sizes = {t: p.stat().st_size for t, p in exported.items()}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]
    assert sizes["f16"] < 0.6 * sizes["f32"] and sizes["q8_0"] < 0.65 * sizes["f16"]
    assert all(not p.with_name(f".{p.name}.tmp").exists() for p in exported.values())


def test_q8_0_keeps_f16_where_rows_do_not_fit_blocks(tmp_path):
    from tunelab.models.tiny import create_tiny_model

    model_dir = create_tiny_model(tmp_path / "odd", hidden=64, layers=1, heads=4, kv_heads=4, intermediate=80)
    path = export_gguf(model_dir, tmp_path / "odd.gguf", outtype="q8_0")
    types = {t["name"]: t["type"] for t in read_gguf(path)["tensors"]}
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 80 values: not a multiple of 32
    assert types["blk.0.ffn_up.weight"] == types["blk.0.attn_q.weight"] == "Q8_0"
    summary = verify_gguf(model_dir, path)
    assert summary["q8_0_fallbacks"] == ["blk.0.ffn_down.weight: row size 80 is not a multiple of 32; kept F16"]
    assert summary["tensor_types"] == {"Q8_0": 8, "F16": 1, "F32": 3}  # 7 block matrices + token_embd + output


def test_tied_embeddings(tmp_path, tiny_model):
    from safetensors.numpy import load_file, save_file

    tied = tmp_path / "tied"
    shutil.copytree(tiny_model, tied)
    config = json.loads((tied / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config))
    # Still holding its own (different) lm_head: transformers does not tie it, so neither may the export.
    path = export_gguf(tied, tmp_path / "untied-head.gguf", outtype="f32")
    assert "output.weight" in {t["name"] for t in read_gguf(path)["tensors"]}
    verify_gguf(tied, path)
    # Saved the way HF saves tied models (no lm_head): no output tensor, llama.cpp reuses token_embd.
    weights = load_file(tied / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tied / "model.safetensors", metadata={"format": "pt"})
    path = export_gguf(tied, tmp_path / "tied.gguf", outtype="f32")
    assert "output.weight" not in {t["name"] for t in read_gguf(path)["tensors"]}
    verify_gguf(tied, path)
    expected = _hf_logits(tied, PROMPT_IDS)
    assert np.abs(_gguf_logits(path, PROMPT_IDS) - expected).max() < 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("preset", ["gpt-2", "starcoder", "llama-bpe", "qwen2"])
def test_each_pre_tokenizer_preset_is_detected_and_reproduces_hf_tokenization(preset):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from tunelab.deploy.gguf import PRE_TOKENIZER_PRESETS, detect_pre_tokenizer
    from tunelab.models.tiny import default_corpus

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=preset in ("gpt-2", "starcoder"))
    split = [pre_tokenizers.Split(Regex(PRE_TOKENIZER_PRESETS[preset][0]), behavior="isolated")]
    steps = {"gpt-2": [], "starcoder": [pre_tokenizers.Digits(individual_digits=True)]}.get(preset, split)
    tokenizer = Tokenizer(models.BPE(ignore_merges=preset == "llama-bpe"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level]) if steps else byte_level
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|im_end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(default_corpus().splitlines() + ["a  1  22   333 (x) don't\n\n  y"], trainer)
    tokenizer_json = json.loads(tokenizer.to_str())
    assert detect_pre_tokenizer(tokenizer_json) == preset
    assert tokenizer_json["model"].get("ignore_merges", False) == (preset == "llama-bpe")
    vocab = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    meta = {"tokenizer.ggml.tokens": [vocab[i] for i in range(len(vocab))],
            "tokenizer.ggml.token_type": [3 if vocab[i] == "<|im_end|>" else 1 for i in range(len(vocab))],
            "tokenizer.ggml.merges": [" ".join(m) for m in tokenizer_json["model"]["merges"]],
            "tokenizer.ggml.pre": preset}
    for text in (*gguf_export._TOKENIZER_PROBES, "<|im_end|>x 12345\n\n", "(x) a  1  22   333"):
        assert gguf_bpe_tokenize(text, meta) == tokenizer.encode(text).ids, (preset, text)


# ---------------------------------------------------------------------------------------------
# Verification catches broken files


def test_verify_catches_a_missing_permutation(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(gguf_export.tensors, "permute_qk", lambda weights, n_head: weights)
    path = export_gguf(tiny_model, tmp_path / "unpermuted.gguf", outtype="f32")
    monkeypatch.undo()
    with pytest.raises(TunelabError, match=r"blk\.0\.attn_q\.weight differs"):
        verify_gguf(tiny_model, path)
    expected = _hf_logits(tiny_model, PROMPT_IDS)
    assert np.abs(_gguf_logits(path, PROMPT_IDS) - expected).max() > 1e-3 * np.abs(expected).max()


def test_verify_catches_a_wrong_pre_tokenizer(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(gguf_export.tokenizer, "detect_pre_tokenizer", lambda tokenizer_json: "gpt-2")
    path = export_gguf(tiny_model, tmp_path / "gpt2-pre.gguf", outtype="f16")
    monkeypatch.undo()
    with pytest.raises(TunelabError, match="llama.cpp-style tokenization of 'a  1"):
        verify_gguf(tiny_model, path)


def test_verify_catches_a_different_model(tmp_path, tiny_model, exported):
    from tunelab.models.tiny import create_tiny_model

    other = create_tiny_model(tmp_path / "other", hidden=64, layers=2, heads=4, kv_heads=2, seed=1)
    with pytest.raises(TunelabError, match="beyond F32 rounding"):
        verify_gguf(other, exported["f32"])


# ---------------------------------------------------------------------------------------------
# Refusals


def test_refuses_other_architectures(tmp_path, tiny_model):
    copy = tmp_path / "gpt2-ish"
    shutil.copytree(tiny_model, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(TunelabError, match=r"model_type 'gpt2'.*supported: llama"):
        export_gguf(copy, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_refuses_bad_requests(tmp_path, tiny_model):
    with pytest.raises(TunelabError, match="--outtype 'q4_0'"):
        export_gguf(tiny_model, tmp_path / "x.gguf", outtype="q4_0")
    with pytest.raises(TunelabError, match="no config.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(TunelabError, match="tunelab merge"):
        export_gguf(adapter, tmp_path / "x.gguf")
    unknown_pre = tmp_path / "unknown-pre"
    shutil.copytree(tiny_model, unknown_pre)
    tokenizer = json.loads((unknown_pre / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = False  # digit runs: no llama.cpp preset
    (unknown_pre / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(TunelabError, match="matches none of the llama.cpp presets"):
        export_gguf(unknown_pre, tmp_path / "x.gguf")
    with pytest.raises(TunelabError, match="not found"):
        read_gguf(tmp_path / "missing.gguf")


def test_missing_gguf_package_says_how_to_install(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(TunelabError, match=r"pip install 'tunelab\[export\]'"):
        export_gguf(tiny_model, tmp_path / "x.gguf")
    with pytest.raises(TunelabError, match=r"pip install 'tunelab\[export\]'"):
        read_gguf(tmp_path / "x.gguf")


# ---------------------------------------------------------------------------------------------
# SentencePiece (Llama-2 style) vocabularies


LLAMA2_SPM = SHARED_DATA / "tokenizers" / "sentencepiece" / "llama2_tokenizer.model"


@pytest.mark.skipif(not LLAMA2_SPM.is_file(), reason="the Llama-2 tokenizer.model test file is not available")
def test_sentencepiece_vocabulary(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    model_dir = tmp_path / "spm-llama"
    model_dir.mkdir()
    shutil.copy(LLAMA2_SPM, model_dir / "tokenizer.model")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))  # as in Llama-2's tokenizer_config.json
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(model_dir)  # adds tokenizer.json, as HF repos have
    config = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)

    path = export_gguf(model_dir, tmp_path / "spm.gguf", outtype="f16")
    summary = verify_gguf(model_dir, path)
    assert summary["tokenizer"]["model"] == "llama" and summary["tokenizer"]["n_pieces"] == 32000
    meta = read_gguf(path)["metadata"]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_SPM))
    assert meta["tokenizer.ggml.pre"] == "default"
    assert meta["tokenizer.ggml.tokens"][:5] == ["<unk>", "<s>", "</s>", "<0x00>", "<0x01>"]
    assert meta["tokenizer.ggml.scores"][1000] == pytest.approx(sp.get_score(1000))
    assert meta["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # UNKNOWN, CONTROL, CONTROL, BYTE
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.unknown_token_id"] == 0
    assert meta["tokenizer.ggml.add_bos_token"] is True  # the Llama-2 tokenizer starts every text with <s>
    assert meta["tokenizer.ggml.add_space_prefix"] is True  # "Hello" is tokenized as "▁Hello"
    assert "tokenizer.ggml.merges" not in meta


def test_sentencepiece_without_a_space_prefix_says_so(tmp_path):
    """Gemma's SentencePiece models add no "▁" before a text; llama.cpp assumes they do unless the file says."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from tunelab.models.tiny import default_corpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(default_corpus())
    model_dir = tmp_path / "spm-no-prefix"
    model_dir.mkdir()
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(model_dir / "tokenizer"),
                                             vocab_size=400, add_dummy_prefix=False, byte_fallback=True,
                                             minloglevel=2)
    assert sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model")) \
        .encode_as_pieces("Hello")[0] != "\u2581Hello"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))
    config = LlamaConfig(vocab_size=448, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    path = export_gguf(model_dir, tmp_path / "no-prefix.gguf", outtype="f32")
    assert read_gguf(path)["metadata"]["tokenizer.ggml.add_space_prefix"] is False
    assert verify_gguf(model_dir, path)["tokenizer"]["add_space_prefix"] is False


# ---------------------------------------------------------------------------------------------
# llama.cpp itself, where llama-cpp-python is installed


def test_generation_in_llama_cpp(exported, tiny_model):
    pytest.importorskip("llama_cpp")
    result = check_with_llama_cpp(tiny_model, exported["f32"], max_new_tokens=6)
    assert result["tokens_match"]
    assert result["max_abs_logit_diff"] < 1e-3 * max(result["max_abs_logit"], 1.0)
