"""``packed_sdpa``: attention for padding-free packed rows without a quadratic block mask.

transformers handles packed rows (``position_ids`` restarting per sequence, no attention mask) by
building a dense block-causal mask over the whole row, so attention costs ``row_length**2`` and
the mask as much memory. ``packed_sdpa`` instead runs causal SDPA on each sequence of the row
(cost: the sum of ``length**2``) and is registered through transformers' public attention and
mask interfaces. Anything that is not a packed training row (padding masks, KV-cache decoding)
goes to transformers' own SDPA path unchanged.

On a GPU with half-precision activations the whole row goes through one variable-length flash
attention call per layer instead (``torch.nn.attention.varlen.varlen_attn``, PyTorch >= 2.10):
the per-sequence loop launches a handful of kernels per sequence per layer, which dominates when
a row holds dozens of short sequences. :func:`packed_kernel` says which of the two a run gets.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "packed_sdpa"
VARLEN_NAME = "packed_varlen"


def segment_lengths(position_ids: torch.Tensor) -> list[list[int]]:
    """Lengths of the sequences in each packed row, found where positions restart."""
    rows = []
    for row in position_ids.tolist():
        starts = [k for k, p in enumerate(row) if k == 0 or p != row[k - 1] + 1]
        rows.append([end - start for start, end in zip(starts, starts[1:] + [len(row)])])
    return rows


def row_lengths(packed: torch.Tensor | list[list[int]], rows: int, width: int) -> list[list[int]]:
    """Per-row sequence lengths from ``packed_seq_lens`` (a flat CPU tensor, or already a list per row).

    Raises:
        ValueError: the lengths do not fill ``rows`` rows of ``width`` tokens exactly.
    """
    if not isinstance(packed, torch.Tensor):
        out = [list(row) for row in packed]
    else:
        flat, out, index = packed.tolist(), [], 0
        for _ in range(rows):
            row: list[int] = []
            filled = 0
            while filled < width and index < len(flat):
                row.append(flat[index])
                filled += flat[index]
                index += 1
            out.append(row)
    if len(out) != rows or any(sum(row) != width for row in out):
        raise ValueError(f"packed_seq_lens do not fill {rows} row(s) of {width} tokens")
    return out


VarlenKernel = Callable[..., torch.Tensor]  # (q, k, v, cu_seqlens, max_len, scale, window) -> (tokens, heads, dim)


@lru_cache(maxsize=1)
def varlen_kernel() -> VarlenKernel | None:
    """PyTorch's causal variable-length flash attention, adapted to one calling convention; None if absent.

    PyTorch 2.10 spells causal ``is_causal=True``; later versions ``window_size=(-1, 0)`` (which
    also serves sliding windows: ``kernel.takes_window``) and take ``enable_gqa`` (without it,
    key/value heads are repeated here for grouped-query attention).
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    takes_window = "window_size" in parameters
    native_gqa, takes_scale = "enable_gqa" in parameters, "scale" in parameters

    def kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
               max_len: int, scale: float | None, window: int | None = None) -> torch.Tensor:
        if takes_window:  # (left, right): a query sees `left` keys back (window - 1: as transformers' windows)
            extra: dict = {"window_size": (window - 1 if window else -1, 0)}
        elif window:
            raise ValueError("this PyTorch's varlen_attn has no sliding window")
        else:
            extra = {"is_causal": True}
        if key.shape[1] != query.shape[1]:
            if native_gqa:
                extra["enable_gqa"] = True
            else:
                groups = query.shape[1] // key.shape[1]
                key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        if takes_scale:
            extra["scale"] = scale
        elif scale is not None:  # the kernel scales by 1/sqrt(dim): fold the difference into the queries
            query = query * (scale * query.shape[-1] ** 0.5)
        return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_len, max_len, **extra)

    kernel.takes_window = takes_window  # type: ignore[attr-defined]
    return kernel


def packed_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """Which kernel packed rows get on ``device`` with activations of ``dtype`` (for the run log)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and varlen_kernel() is not None:
        return "varlen flash attention (one call per layer for the whole row)"
    reason = ("this PyTorch has no torch.nn.attention.varlen" if varlen_kernel() is None
              else "it needs CUDA and bf16/fp16 activations")
    return f"per-sequence SDPA (the varlen kernel is off: {reason})"


def _on_half_precision_gpu(query: torch.Tensor) -> bool:
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


def _uses_varlen(query: torch.Tensor, dropout: float, kwargs: dict) -> bool:
    kernel = varlen_kernel()
    return (_on_half_precision_gpu(query) and not dropout and kernel is not None
            and (not kwargs.get("sliding_window") or kernel.takes_window))


_cu_seqlens_cache: list = [None, None, 0]  # [lengths object, cu_seqlens tensor, max length]: one per forward


def _cu_seqlens(lengths: torch.Tensor | list[list[int]], device: torch.device) -> tuple[torch.Tensor, int]:
    """Cumulative sequence starts over all rows (int32, on ``device``), built once per forward.

    Every layer of one forward gets the same ``packed_seq_lens`` object, so the host-to-device
    copy happens once per forward, not once per layer.
    """
    if _cu_seqlens_cache[0] is not lengths or _cu_seqlens_cache[1].device != device:
        flat = lengths.tolist() if isinstance(lengths, torch.Tensor) else [n for row in lengths for n in row]
        starts = torch.tensor([0, *flat], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        _cu_seqlens_cache[:] = [lengths, starts.to(device, non_blocking=True), max(flat)]
    return _cu_seqlens_cache[1], _cu_seqlens_cache[2]


def varlen_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   lengths: torch.Tensor | list[list[int]], scaling: float | None,
                   kernel: VarlenKernel | None = None, window: int | None = None) -> torch.Tensor:
    """Causal attention within each packed sequence of every row, in one kernel call.

    Takes transformers' (batch, heads, tokens, dim) layout and returns (batch, tokens, heads, dim),
    as transformers' attention functions do. ``kernel``: the varlen kernel (default: PyTorch's);
    ``window``: the model's sliding window, if any.
    """
    batch, heads, tokens, dim = query.shape
    flat = lambda t: t.transpose(1, 2).reshape(batch * tokens, t.shape[1], dim)  # noqa: E731
    cu_seqlens, max_len = _cu_seqlens(lengths, query.device)
    out = (kernel or varlen_kernel())(flat(query), flat(key), flat(value), cu_seqlens, max_len, scaling, window)
    return out.view(batch, tokens, heads, dim)


@torch.compiler.disable  # eager: its Python loops over sequences would specialise a compiled graph
def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention per packed sequence; transformers' SDPA for anything else.

    Registered as ``packed_varlen`` (the varlen kernel where it runs, SDPA per sequence elsewhere)
    and ``packed_sdpa`` (always SDPA per sequence), told apart by ``module.config._attn_implementation``.
    ``packed_seq_lens`` (the row layout as ``Batch.model_inputs`` passes it: every row's lengths,
    flat, in a CPU tensor) avoids reading ``position_ids`` back from the device; without it
    the lengths are derived from them.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or q_len != kv_len or q_len == 1 or position_ids is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    packed = kwargs.get("packed_seq_lens")
    if packed is None:
        packed = segment_lengths(position_ids.expand(query.shape[0], -1))
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if implementation == VARLEN_NAME and _uses_varlen(query, dropout, kwargs):
        return varlen_forward(query, key, value, packed, scaling, window=kwargs.get("sliding_window")), None
    lengths = row_lengths(packed, query.shape[0], q_len)
    window = kwargs.get("sliding_window")
    rows = []
    for row, sizes in enumerate(lengths):
        # split (not slicing): its backward is one concatenation, not a full-size zero tensor per piece.
        pieces = [
            sdpa_attention_forward(module, q, k, v, sliding_window_mask(q.shape[2], window, q.device),
                                   dropout=dropout, scaling=scaling)[0]
            for q, k, v in zip(
                query[row : row + 1].split(sizes, dim=2),
                key[row : row + 1].split(sizes, dim=2),
                value[row : row + 1].split(sizes, dim=2),
            )
        ]
        rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return (torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]), None


def sliding_window_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Causal mask of one sequence that also hides keys ``window`` or more positions back.

    That is what transformers' sliding-window layers (Mistral, Gemma, ...) attend to. None where
    plain causal attention is the same: no window, or a sequence no longer than it.
    """
    if not window or length <= window:
        return None
    positions = torch.arange(length, device=device)
    distance = positions[:, None] - positions[None, :]
    return ((distance >= 0) & (distance < window))[None, None]


def packed_sdpa_mask(*args, **kwargs) -> torch.Tensor | None:
    """No mask for a training row without padding (packed or not); the SDPA mask otherwise."""
    if kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get("kv_length") and not kwargs.get("q_offset"):
        return None
    return sdpa_mask(*args, **kwargs)


def register_packed_sdpa(varlen: bool = False) -> str:
    """Register the packed attention with transformers (idempotent) and return its name.

    ``varlen``: ``packed_varlen`` (one varlen flash call per layer where it can run) instead of
    ``packed_sdpa`` (SDPA per sequence, everywhere).
    """
    name = VARLEN_NAME if varlen else NAME
    AttentionInterface.register(name, packed_attention_forward)
    AttentionMaskInterface.register(name, packed_sdpa_mask)
    return name
