"""The HF tokenizer as GGUF vocabulary metadata: byte-level BPE (``gpt2``) or SentencePiece (``llama``).

Also the pre-tokenizer preset detection (``tokenizer.ggml.pre``), special ids, add-BOS/EOS and
the chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.deploy.gguf.bpe import _IGNORE_MERGES_PRESETS, _LLAMA3_REGEX, _QWEN2_REGEX, PRE_TOKENIZER_PRESETS
from tunelab.deploy.gguf.gguf_lib import _gguf
from tunelab.errors import TunelabError

_SPECIAL_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}


@dataclass
class _Tokenizer:
    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int]  # bos, eos, eot, eom, unk, pad
    add_bos: bool
    add_eos: bool
    chat_template: str | list[dict[str, str]] | None
    n_hf_tokens: int
    notes: list[str]
    add_space_prefix: bool | None = None  # SentencePiece only: whether a text gets a leading "▁" first


def _load_hf_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise TunelabError(f"--model {model_dir}: cannot load the tokenizer: {exc}") from None


def _generation_stop_ids(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else [int(i) for i in eos]


def _special_ids(model_dir: Path, hf: Any, n_vocab: int) -> tuple[dict[str, int], list[str]]:
    """bos/eos/unk/pad from the tokenizer; the other stop ids of generation_config.json as eot, eom."""
    notes: list[str] = []
    ids = {kind: getattr(hf, f"{kind}_token_id") for kind in ("bos", "eos", "unk", "pad")}
    ids = {k: int(v) for k, v in ids.items() if v is not None}
    stops = _generation_stop_ids(model_dir)
    if "eos" not in ids and stops:
        ids["eos"] = stops[0]
    extra = [i for i in stops if i != ids.get("eos")]
    for kind, token_id in zip(("eot", "eom"), extra):
        ids[kind] = token_id
    if len(extra) > 2:
        notes.append(f"generation_config.json has {len(stops)} stop ids; GGUF holds eos, eot and eom only "
                     f"({extra[2:]} are left to llama.cpp's detection by token text)")
    bad = {k: v for k, v in ids.items() if not 0 <= v < n_vocab}
    if bad:
        raise TunelabError(f"special token ids {bad} are outside the vocabulary of {n_vocab}")
    return ids, notes


def _adds_special(hf: Any) -> tuple[bool, bool]:
    """Whether the HF tokenizer adds BOS / EOS to a plain text (llama.cpp must do the same)."""
    plain = hf.encode("Hello", add_special_tokens=False)
    full = hf.encode("Hello", add_special_tokens=True)
    add_bos = hf.bos_token_id is not None and full[:1] == [hf.bos_token_id] and plain[:1] != [hf.bos_token_id]
    add_eos = hf.eos_token_id is not None and full[-1:] == [hf.eos_token_id] and plain[-1:] != [hf.eos_token_id]
    return bool(add_bos), bool(add_eos)


def _chat_template(hf: Any) -> str | list[dict[str, str]] | None:
    template = hf.chat_template
    if isinstance(template, dict):
        return [{"name": name, "template": text} for name, text in template.items()]
    return template or None


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer preset (``tokenizer.ggml.pre``) equivalent to a byte-level BPE tokenizer.json.

    Recognised: GPT-2's ByteLevel regex (``gpt-2``); digits split one by one, then ByteLevel
    (``starcoder``, the tiny models' tokenizer); Llama-3's split regex (``llama-bpe``); Qwen2's
    (``qwen2``). Anything else raises: a wrong preset tokenizes differently in llama.cpp without
    any error.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]

    def byte_level(step: dict[str, Any], use_regex: bool) -> bool:
        return (step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == use_regex
                and not step.get("add_prefix_space", False))

    def split(step: dict[str, Any], pattern: str) -> bool:
        return (step.get("type") == "Split" and step.get("pattern", {}).get("Regex") == pattern
                and step.get("behavior") == "Isolated" and not step.get("invert", False))

    if len(steps) == 1 and byte_level(steps[0], True):
        return "gpt-2"
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and byte_level(steps[1], True):
        return "starcoder"
    for preset, pattern in (("llama-bpe", _LLAMA3_REGEX), ("qwen2", _QWEN2_REGEX)):
        if len(steps) == 2 and split(steps[0], pattern) and byte_level(steps[1], False):
            return preset
    raise TunelabError(
        f"tokenizer.json: pre-tokenizer {json.dumps(pre)[:300]} matches none of the llama.cpp presets tunelab "
        f"knows ({', '.join(PRE_TOKENIZER_PRESETS)}); llama.cpp would split text differently from the HF tokenizer"
    )


def _bpe_tokenizer(model_dir: Path, tokenizer_json: dict[str, Any], hf: Any, n_vocab: int) -> _Tokenizer:
    """A byte-level BPE tokenizer.json as tokenizer.ggml.model ``gpt2``."""
    gguf = _gguf()
    model = tokenizer_json["model"]
    if model.get("byte_fallback"):
        raise TunelabError("tokenizer.json: BPE with byte_fallback is a SentencePiece-style tokenizer; "
                           "keep its tokenizer.model next to it to export it as a llama (SentencePiece) vocabulary")
    decoder = (tokenizer_json.get("decoder") or {}).get("type")
    if decoder != "ByteLevel":
        raise TunelabError(f"tokenizer.json: decoder {decoder!r}; a byte-level BPE (ByteLevel decoder) is needed")
    normalizer = tokenizer_json.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise TunelabError(f"tokenizer.json: normalizer {normalizer.get('type')!r} has no llama.cpp equivalent")
    pre = detect_pre_tokenizer(tokenizer_json)
    if bool(model.get("ignore_merges", False)) != (pre in _IGNORE_MERGES_PRESETS):
        raise TunelabError(f"tokenizer.json: ignore_merges={model.get('ignore_merges', False)} does not match "
                           f"llama.cpp's {pre!r} preset")
    id_to_token: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in tokenizer_json.get("added_tokens", [])}
    for token_id, token in added.items():
        id_to_token[token_id] = token["content"]
    if max(id_to_token) >= n_vocab:
        raise TunelabError(f"the tokenizer has ids up to {max(id_to_token)} but config.json's vocab_size is {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(id_to_token[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(id_to_token[i])
            types.append(int(gguf.TokenType.NORMAL))
    if len(set(tokens)) != len(tokens):
        raise TunelabError("tokenizer.json: two ids share a token text; llama.cpp needs unique tokens")
    special_ids, notes = _special_ids(model_dir, hf, n_vocab)
    add_bos, add_eos = _adds_special(hf)
    return _Tokenizer(
        model="gpt2", pre=pre, tokens=tokens, token_types=types, scores=None,
        merges=_merges(model), special_ids=special_ids, add_bos=add_bos, add_eos=add_eos,
        chat_template=_chat_template(hf), n_hf_tokens=len(id_to_token), notes=notes,
    )


def _merges(bpe_model: dict[str, Any]) -> list[str]:
    merges = bpe_model.get("merges") or []
    out = []
    for merge in merges:
        if isinstance(merge, str):
            out.append(merge)
        elif any(" " in part for part in merge):
            raise TunelabError(f"tokenizer.json: merge {merge} holds a space; llama.cpp's merges are space separated")
        else:
            out.append(" ".join(merge))
    return out


def sentencepiece_adds_space_prefix(model_file: Path) -> bool:
    """Whether a SentencePiece model prefixes a text with "▁" (``add_dummy_prefix``; Llama 2: yes, Gemma: no).

    llama.cpp assumes yes unless ``tokenizer.ggml.add_space_prefix`` says otherwise.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # no protobuf: ask the model itself
        from sentencepiece import SentencePieceProcessor

        return SentencePieceProcessor(model_file=str(model_file)).encode_as_pieces("a")[0].startswith("\u2581")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return bool(proto.normalizer_spec.add_dummy_prefix)


def _sentencepiece_tokenizer(model_dir: Path, hf: Any, n_vocab: int) -> _Tokenizer:
    """A SentencePiece tokenizer.model (Llama 1/2, Mistral v0.1) as tokenizer.ggml.model ``llama``."""
    gguf = _gguf()
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise TunelabError(
            f"{model_dir / 'tokenizer.model'}: exporting a SentencePiece tokenizer needs the sentencepiece "
            "package (pip install sentencepiece) to read the piece scores"
        ) from None
    sp = SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    if sp.vocab_size() > n_vocab:
        raise TunelabError(f"tokenizer.model has {sp.vocab_size()} pieces but config.json's vocab_size is {n_vocab}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i] = sp.id_to_piece(i)
        scores[i] = float(sp.get_score(i))
        types[i] = int(
            gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
            else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
            else gguf.TokenType.NORMAL
        )
    n_hf = sp.vocab_size()
    for token_id, token in hf.added_tokens_decoder.items():
        if token_id < sp.vocab_size():
            continue  # a piece of the SentencePiece model: its own type and score stay
        if token_id >= n_vocab:
            raise TunelabError(f"added token {token.content!r} has id {token_id} >= vocab_size {n_vocab}")
        tokens[token_id] = token.content if token.special else token.content.replace("\u2581", " ")
        scores[token_id] = -1000.0
        types[token_id] = int(gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED)
        n_hf = max(n_hf, token_id + 1)
    special_ids, notes = _special_ids(model_dir, hf, n_vocab)
    add_bos, add_eos = _adds_special(hf)
    return _Tokenizer(
        model="llama", pre="default", tokens=tokens, token_types=types, scores=scores, merges=[],
        special_ids=special_ids, add_bos=add_bos, add_eos=add_eos, chat_template=_chat_template(hf),
        n_hf_tokens=n_hf, notes=notes, add_space_prefix=sentencepiece_adds_space_prefix(model_dir / "tokenizer.model"),
    )


def _read_tokenizer(model_dir: Path, n_vocab: int) -> _Tokenizer:
    hf = _load_hf_tokenizer(model_dir)
    tokenizer_json_path = model_dir / "tokenizer.json"
    tokenizer_json = (json.loads(tokenizer_json_path.read_text(encoding="utf-8"))
                      if tokenizer_json_path.is_file() else {})
    model_type = tokenizer_json.get("model", {}).get("type")
    sentencepiece_like = model_type in (None, "Unigram") or bool(tokenizer_json.get("model", {}).get("byte_fallback"))
    if (model_dir / "tokenizer.model").is_file() and sentencepiece_like:
        return _sentencepiece_tokenizer(model_dir, hf, n_vocab)
    if model_type == "BPE":
        return _bpe_tokenizer(model_dir, tokenizer_json, hf, n_vocab)
    raise TunelabError(
        f"--model {model_dir}: tokenizer model {model_type!r} cannot be exported; tunelab writes byte-level BPE "
        "tokenizers (tokenizer.json) and SentencePiece tokenizers (tokenizer.model)"
    )
