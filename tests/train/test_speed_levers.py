"""GPU speed levers, checked on the CPU: varlen packed attention, selective checkpointing, compiled layers.

The varlen flash kernel itself only runs on CUDA; here a reference implementation of its contract
(causal attention inside each ``cu_seqlens`` segment, tensors laid out (tokens, heads, dim)) stands
in for it, so what is checked is tunelab's side: the signature adaptation across PyTorch versions,
grouped-query heads, the layout in and out of transformers' attention call, and the dispatch.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import tunelab.models.attention as attention
from conftest import ALPACA_DEMO, make_config
from tunelab.config import TunelabConfig
from tunelab.data.packing import collate_packed
from tunelab.models.adapters import enable_gradient_checkpointing
from tunelab.train.speed import compile_blocker
from tunelab.train.engine import train
from tunelab.train.objectives.sft import causal_lm_loss
from tunelab.train.reporting import read_metrics


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=None, enable_gqa=False, **causal):
    """What PyTorch's varlen_attn computes (causal, optionally with a left window), with SDPA one segment at a time."""
    left = causal.get("window_size", (-1, 0))[0]
    assert causal == {"is_causal": True} or causal["window_size"][1] == 0
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32 and max_q == max_k
    assert max_q == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    if key.shape[1] != query.shape[1]:
        assert enable_gqa, "fewer key heads than query heads need enable_gqa (or repeated heads)"
    starts = cu_seq_q.tolist()
    pieces = []
    for a, b in zip(starts, starts[1:]):
        distance = torch.arange(b - a)[:, None] - torch.arange(b - a)[None, :]
        mask = (distance >= 0) & ((distance <= left) if left >= 0 else True)  # a query sees `left` keys back
        pieces.append(F.scaled_dot_product_attention(
            query[a:b].transpose(0, 1), key[a:b].transpose(0, 1), value[a:b].transpose(0, 1), attn_mask=mask,
            scale=scale, enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(pieces)


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """PyTorch 2.10's signature: is_causal, no scale, no grouped-query support."""
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=is_causal)


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False):
    """PyTorch 2.11+'s signature: window_size for causal, enable_gqa."""
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, enable_gqa=enable_gqa,
                            window_size=window_size)


@pytest.fixture
def fake_varlen(monkeypatch):
    """Install one of the fake varlen_attn signatures as torch's; count the calls."""
    import torch.nn.attention.varlen as varlen_module

    calls = []

    def install(function):
        @functools.wraps(function)  # keeps the signature the adapter inspects
        def counted(*args, **kwargs):
            calls.append(args[3].tolist())
            return function(*args, **kwargs)

        monkeypatch.setattr(varlen_module, "varlen_attn", counted)
        attention.varlen_kernel.cache_clear()
        return calls

    yield install
    attention.varlen_kernel.cache_clear()


@pytest.mark.parametrize("signature", [varlen_attn_2_10, varlen_attn_2_11], ids=["torch-2.10", "torch-2.11+"])
def test_varlen_kernel_adapts_to_each_pytorch_signature_with_grouped_query_heads(fake_varlen, signature):
    fake_varlen(signature)
    generator = torch.Generator().manual_seed(0)
    lengths = [[5, 9, 2], [16]]
    query = torch.randn(2, 4, 16, 8, generator=generator)  # (batch, heads, tokens, dim): 4 query heads
    key, value = torch.randn(2, 2, 16, 8, generator=generator), torch.randn(2, 2, 16, 8, generator=generator)
    out = attention.varlen_forward(query, key, value, lengths, scaling=0.3)
    expected = []
    for row, row_lengths in enumerate(lengths):
        expected.append(torch.cat([
            F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True).transpose(1, 2)
            for q, k, v in zip(query[row:row + 1].split(row_lengths, 2), key[row:row + 1].split(row_lengths, 2),
                               value[row:row + 1].split(row_lengths, 2))
        ], dim=1))
    assert out.shape == (2, 16, 4, 8)
    assert torch.allclose(out, torch.cat(expected), atol=1e-6)


def test_packed_varlen_model_equals_separate_sequences_with_one_kernel_call_per_layer(tiny_model, fake_varlen,
                                                                                  monkeypatch):
    calls = fake_varlen(varlen_attn_2_11)
    monkeypatch.setattr(attention, "_uses_varlen", lambda query, dropout, kwargs: True)  # as on a GPU in bf16
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention.register_packed_sdpa(True))
    model.eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query heads
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in (7, 12, 3)]
    batch = collate_packed([{"input_ids": ids, "labels": ids} for ids in sequences])
    with torch.no_grad():
        packed = model(**batch.model_inputs()).logits[0]
        separate = torch.cat([model(torch.tensor([ids])).logits[0] for ids in sequences])
    assert torch.allclose(packed, separate, atol=1e-5)
    layers = model.config.num_hidden_layers
    assert calls[:layers] == [[0, 7, 19, 22]] * layers  # the packed row: one call per layer
    assert calls[layers:] == [[0, 7]] * layers + [[0, 12]] * layers + [[0, 3]] * layers  # each alone: one segment


@pytest.mark.parametrize("signature", [varlen_attn_2_10, varlen_attn_2_11], ids=["torch-2.10", "torch-2.11+"])
def test_sliding_window_models_pack_with_the_varlen_kernel_where_it_has_windows(tiny_mistral, fake_varlen,
                                                                                monkeypatch, signature):
    calls = fake_varlen(signature)
    monkeypatch.setattr(attention, "_on_half_precision_gpu", lambda query: True)  # as on a GPU in bf16
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in (12, 3, 9)]
    batch = collate_packed([{"input_ids": ids, "labels": ids} for ids in sequences])
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(tiny_mistral, attn_implementation="sdpa").eval()
        separate = torch.cat([model(torch.tensor([ids])).logits[0] for ids in sequences])
        model = AutoModelForCausalLM.from_pretrained(tiny_mistral,
                                                     attn_implementation=attention.register_packed_sdpa(True)).eval()
        packed = model(**batch.model_inputs()).logits[0]
    assert torch.allclose(packed, separate, atol=1e-5)
    # 2.11+ takes the window (window_size=(4, 0)); 2.10 cannot, so the per-sequence path serves it.
    assert calls == ([[0, 12, 15, 24]] * 2 if signature is varlen_attn_2_11 else [])


def test_packed_sdpa_never_takes_the_varlen_path(tiny_model, fake_varlen, monkeypatch):
    calls = fake_varlen(varlen_attn_2_11)
    monkeypatch.setattr(attention, "_uses_varlen", lambda query, dropout, kwargs: True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention.register_packed_sdpa())
    batch = collate_packed([{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}, {"input_ids": [9, 10], "labels": [9, 10]}])
    with torch.no_grad():
        model(**batch.model_inputs())
    assert calls == []


def test_packed_kernel_says_why_the_varlen_kernel_is_off_on_a_cpu():
    assert attention.packed_kernel(torch.device("cpu"), torch.bfloat16).startswith("per-sequence SDPA")
    assert "needs CUDA" in attention.packed_kernel(torch.device("cpu"), torch.bfloat16)
    query = torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16)
    assert not attention._uses_varlen(query, 0.0, {})


def saved_activation_bytes(model, batch) -> int:
    """Bytes autograd keeps for backward outside checkpointed regions, for one forward."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = causal_lm_loss(model, batch)
    loss.backward()
    return total


def test_selective_checkpointing_keeps_part_of_the_activations_with_the_same_gradients(tmp_path):
    from tunelab.models.tiny import create_tiny_model

    path = create_tiny_model(tmp_path / "tiny4", hidden=64, layers=4, heads=4)
    generator = torch.Generator().manual_seed(0)
    examples = [{"input_ids": ids, "labels": ids} for ids in
                (torch.randint(3, 500, (n,), generator=generator).tolist() for n in (40, 25))]
    batch = collate_packed(examples)
    measured, gradients = {}, {}
    for fraction in (None, 0.5, 1.0):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention.register_packed_sdpa()).train()
        if fraction is not None:
            checkpointed, layers = enable_gradient_checkpointing(model, fraction)
            assert (checkpointed, layers) == (round(4 * fraction), 4)
            assert [layer.gradient_checkpointing for layer in model.model.layers] == (
                [True, False, True, False] if fraction == 0.5 else [True] * 4)
        measured[fraction] = saved_activation_bytes(model, batch)
        gradients[fraction] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert measured[None] > measured[0.5] > measured[1.0], measured
    assert torch.allclose(gradients[0.5], gradients[None], atol=1e-6)
    assert torch.allclose(gradients[1.0], gradients[None], atol=1e-6)


def test_compile_switches_off_where_it_does_not_pay_and_says_why():
    config = lambda **train: TunelabConfig.model_validate(  # noqa: E731
        {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "output_dir": "o", "train": train})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "CUDA only" in compile_blocker(config(), cpu)
    assert compile_blocker(config(compile="on"), cpu) is None
    assert compile_blocker(config(compile=False), cuda) == "train.compile is off"  # YAML's bare off
    ds = TunelabConfig.model_validate({"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "output_dir": "o",
                                       "train": {"compile": "on"}, "distributed": {"strategy": "deepspeed"}})
    assert "DeepSpeed" in compile_blocker(ds, cuda)


def test_compiled_layers_follow_the_eager_loss_curve_without_recompiling(tmp_path, tiny_model, capsys):
    """After the first steps (new shapes, grad modes, evaluation) no packing layout recompiles a layer.

    The packed layout reaches the layers as a tensor; a list there made every new number of
    sequences per row a recompile, until torch.compile gave up on the layer.
    """

    def no_recompiles_from_now(model, tokenizer, template, records):  # an evaluator: runs after step 2's evaluation
        torch._dynamo.config.error_on_recompile = True
        return {}

    curves = {}
    try:
        for setting in ("off", "on"):
            config = make_config(tmp_path / setting, tiny_model, ALPACA_DEMO, data={"max_samples": 60},
                                 train={"max_steps": 8, "compile": setting, "lr": 2e-3, "eval_every": 2,
                                        "gradient_checkpointing": True, "checkpoint_layers": 0.5})
            evaluators = [no_recompiles_from_now] if setting == "on" else []
            result = train(TunelabConfig.model_validate(config), evaluators=evaluators)
            curves[setting] = [row["loss"] for row in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in row]
            log = capsys.readouterr().err
            assert ("compile: 2 decoder layers with torch.compile" in log) == (setting == "on")
            assert "gradient checkpointing: 1 of 2 decoder layers" in log
            assert "packed attention: per-sequence SDPA (the varlen kernel is off" in log
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()  # drop the compiled graphs (and their fake parameters) before other tests run
    difference = max(abs(a - b) for a, b in zip(curves["on"], curves["off"]))
    assert len(curves["on"]) == 8 and difference < 1e-4, (difference, curves)
