"""Every tiny model family (llama, mistral, qwen2, qwen3, gemma3): packing parity, LoRA + merge, GGUF export.

Each family is built once (hidden 64, 2 layers; Gemma 3 with 6 layers so that one is global, and
Gemma 3 and the windowed Mistral with an 8-token sliding window, crossed by every test sequence).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ALPACA_DEMO, make_config
from gguf_reference import gguf_logits
from tunelab.errors import TunelabError
from tunelab.models.tiny import SUPPORTED_ARCHS, create_tiny_model

FAMILIES = {  # arch -> (model class, create_tiny_model arguments)
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {}),
    "mistral-window": ("MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {}),
    "gemma3": ("Gemma3ForCausalLM", {"layers": 6, "sliding_window": 8}),
}
PACKING_FAMILIES = ["llama", "mistral-window", "qwen2", "qwen3", "gemma3"]
EXPORT_FAMILIES = ["mistral", "qwen2", "qwen3", "gemma3"]  # llama: test_gguf_export.py
IDS = [5, 17, 99, 4, 230, 31, 8, 64, 120, 7, 300, 12, 45, 6, 77, 18]  # 16 tokens: twice the 8-token windows


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    """``family(name)``: the tiny model directory of a family, built on first use."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("families")

    def get(name: str) -> Path:
        if name not in built:
            arch = name.split("-")[0]
            options = {"layers": 2, **FAMILIES[name][1]}
            built[name] = create_tiny_model(root / f"tiny-{name}", arch=arch, hidden=64, heads=4, kv_heads=2, **options)
        return built[name]

    return get


def _logits(model_dir: Path, ids: list[int], **kwargs) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_every_family_is_offered():
    assert SUPPORTED_ARCHS == ("llama", "mistral", "qwen2", "qwen3", "gemma3")
    with pytest.raises(TunelabError, match="--arch 'phi3' is not supported; choose one of llama, mistral"):
        create_tiny_model("/nonexistent", arch="phi3")
    with pytest.raises(TunelabError, match="no sliding window"):
        create_tiny_model("/nonexistent", arch="qwen2", sliding_window=16)


def test_a_config_builds_the_tiny_model_of_its_family(tmp_path):
    from tunelab.config import config_from_dict
    from tunelab.train.engine import ensure_tiny_model

    model_dir = tmp_path / "tiny-qwen3"
    config = make_config(tmp_path, model_dir, ALPACA_DEMO)
    config["model"]["tiny"] = {"arch": "qwen3", "layers": 1}
    ensure_tiny_model(config_from_dict(config))
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen3"


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3", "gemma3"])
def test_each_family_loads_in_plain_transformers_with_the_chat_tokenizer(family, tiny_model, name):
    model_dir = family(name)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[name][0]]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = [{"role": "user", "content": "Add 17 and 25."}, {"role": "assistant", "content": "42"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == AutoTokenizer.from_pretrained(tiny_model).apply_chat_template(chat, tokenize=False)
    stops = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    assert stops == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    if name == "qwen2":  # transformers rebuilds qwen2 tokenizers as Qwen2Tokenizer: the saved one must survive it
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        assert type(tokenizer).__name__ == "Qwen2Tokenizer"
        assert tokenizer.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids
    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    vectors = [v for k, v in state.items() if v.ndim == 1]
    assert all(v.std() > 0.01 for v in vectors)  # norms and biases are random, not constants an export could fake
    if name == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in state
    if name in ("qwen3", "gemma3"):
        assert state["model.layers.0.self_attn.q_norm.weight"].shape == (config["head_dim"],)


@pytest.mark.parametrize("name", PACKING_FAMILIES)
def test_packed_logits_equal_per_sequence_logits(family, name):
    """Padding-free packed rows give each sequence's own logits, sliding windows included."""
    from tunelab.data.packing import collate_packed
    from tunelab.models.attention import register_packed_sdpa

    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(10, 900, (n,), generator=generator).tolist() for n in (19, 3, 12, 7)]
    batch = collate_packed([{"input_ids": ids, "labels": ids} for ids in sequences])
    model = AutoModelForCausalLM.from_pretrained(family(name), attn_implementation=register_packed_sdpa(),
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        packed = model(**batch.model_inputs()).logits[0]
        separate = torch.cat([model(torch.tensor([ids])).logits[0] for ids in sequences])
    assert (packed - separate).abs().max() < 1e-5 * separate.abs().max()
    if name in ("mistral-window", "gemma3"):  # the window matters: without it the long sequences differ
        unwindowed = torch.cat([_logits(family(name), ids, sliding_window=10_000) for ids in sequences])
        assert not torch.allclose(unwindowed, separate, atol=1e-3)


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3", "gemma3"])
def test_lora_trains_and_merges_into_the_same_model(tmp_path, family, name):
    from peft import PeftModel

    from tunelab.config import config_from_dict
    from tunelab.deploy.merge import merge_adapter
    from tunelab.train.engine import train

    base_dir = family(name)
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(json.loads(ALPACA_DEMO.read_text())[:24]))
    config = make_config(tmp_path, base_dir, data, method={"type": "lora", "rank": 4, "alpha": 16},
                         train={"max_steps": 3, "lr": 1e-2, "batch_tokens": 512})
    adapter = train(config_from_dict(config)).final_dir
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and all(np.isfinite(losses))
    merged = merge_adapter(adapter, tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        expected = with_adapter(torch.tensor([IDS])).logits[0]
    actual = _logits(merged, IDS)
    assert (actual - expected).abs().max() < 1e-5 * expected.abs().max()
    assert not torch.allclose(actual, _logits(base_dir, IDS), atol=1e-4)  # training changed the model


@pytest.mark.parametrize("name", EXPORT_FAMILIES)
def test_gguf_export_reads_back_as_the_hf_model(tmp_path, family, name):
    """verify_gguf passes; llama.cpp's graph over the file and transformers' GGUF reader give the HF logits."""
    from tunelab.deploy.gguf import export_gguf, read_gguf, verify_gguf

    model_dir = family(name)
    path = export_gguf(model_dir, tmp_path / f"{name}.gguf", outtype="f32")
    verify_gguf(model_dir, path)
    expected = _logits(model_dir, IDS).double().numpy()
    scale = np.abs(expected).max()
    assert np.abs(gguf_logits(path, IDS) - expected).max() < 1e-5 * scale
    read_back = _logits(path.parent, IDS, gguf_file=path.name).double().numpy()
    assert np.abs(read_back - expected).max() < 1e-5 * scale

    info = read_gguf(path)
    meta, tensors = info["metadata"], {t["name"] for t in info["tensors"]}
    arch = {"mistral": "llama"}.get(name, name)
    assert meta["general.architecture"] == arch and meta[f"{arch}.block_count"] == FAMILIES[name][1].get("layers", 2)
    if name == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= tensors
        assert meta["tokenizer.ggml.pre"] == "qwen2"
    if name in ("qwen3", "gemma3"):
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= tensors
        assert meta[f"{arch}.attention.key_length"] == {"qwen3": 128, "gemma3": 256}[name]
    if name in ("qwen2", "qwen3", "gemma3"):
        assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    if name == "gemma3":
        assert meta["gemma3.attention.sliding_window"] == 8
        assert {"blk.5.post_attention_norm.weight", "blk.5.post_ffw_norm.weight"} <= tensors
        stored = _stored(path, "output_norm.weight")
        hf = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()["model.norm.weight"].numpy()
        assert np.allclose(stored, hf + 1.0)  # llama.cpp multiplies by the weight, HF's Gemma by 1 + weight


def _stored(path: Path, name: str) -> np.ndarray:
    import gguf

    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


@pytest.mark.parametrize("name, change, message", [
    ("gemma3", {"layer_types": ["full_attention"] * 6}, "differ from Gemma 3's pattern"),
    ("gemma3", {"query_pre_attn_scalar": 64}, "scales Gemma 3's queries by 1/sqrt"),
    ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ("qwen3", {"attention_bias": True}, "no Q/K/V biases"),
    ("qwen2", {"use_sliding_window": True, "layer_types": ["sliding_attention"] * 2}, "sliding-window layers"),
    ("mistral", {"hidden_act": "gelu"}, "activation 'gelu'"),
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope scaling 'yarn'"),
])
def test_gguf_export_refuses_what_llama_cpp_would_compute_differently(tmp_path, family, name, change, message):
    from tunelab.deploy.gguf import export_gguf

    copy = tmp_path / name
    shutil.copytree(family(name), copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(TunelabError, match=message):
        export_gguf(copy, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_mistral_window_shorter_than_the_context_becomes_the_gguf_context(tmp_path, family):
    from tunelab.deploy.gguf import arch_of, export_gguf, read_gguf
    from tunelab.deploy.gguf.archs import export_notes

    model_dir = family("mistral-window")
    config = json.loads((model_dir / "config.json").read_text())
    assert arch_of(config).name == "llama"
    path = export_gguf(model_dir, tmp_path / "window.gguf", outtype="f32")
    assert read_gguf(path)["metadata"]["llama.context_length"] == 8
    assert "without a window" in export_notes(config)[0]
    expected = _logits(model_dir, IDS[:8]).double().numpy()  # within the window, full attention is the same
    assert np.abs(gguf_logits(path, IDS[:8]) - expected).max() < 1e-5 * np.abs(expected).max()
