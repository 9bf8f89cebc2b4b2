"""Attention: torch's ``scaled_dot_product_attention`` signature, a native ``flash_attention`` with
the extras (bottom-right causal, the log-sum-exp), and packed variable-length batches.

Causal alignment, for Sq = 3 queries over Sk = 5 keys (x = visible):

    top_left (torch's is_causal)     bottom_right (decoding with a KV cache)
        x . . . .                        x x x . .
        x x . . .                        x x x x .
        x x x . .                        x x x x x

A query row that sees no key gives zeros and zero gradients, as torch's SDPA does. torch's
``CausalBias`` masks (``causal_upper_left``, ``causal_lower_right``) are read as these two
alignments, never as tensors. Double backward (``create_graph=True``) recomputes the forward
with the eager reference, probabilities materialised.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F

from engine import backend
from engine.errors import InvalidArgument, InvalidDtype
from engine.ops.reference import attention_reference, varlen_reference

CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")
NO_WINDOW = (-2, -2)  # the window sides torch.ops.engine.attention_fwd takes for "no window" (engine.ops.library)
_PLAIN_TORCH_FUNCTION = (torch.Tensor.__torch_function__.__func__, torch._C._disabled_torch_function_impl)


def dropout_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """The Philox seed for one attention call: a (1,) int64 tensor on ``device``, drawn from
    ``generator`` (default: the device's) without a host round trip; a CPU generator's draw is
    copied over."""
    where = device if generator is None else generator.device
    return torch.randint(0, 2**31 - 1, (1,), generator=generator, device=where).to(device)


def setup_attention_backward(ctx, inputs, output, keyword_only_inputs=None) -> None:
    """torch.ops.engine.attention_fwd's autograd context (registered by engine.ops.library). Saves
    q, k, v, the output and the log-sum-exp (with its low part when there is an additive
    mask): memory linear in Sq."""
    (q, k, v, mask, scale, causal, dropout_p, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
     deterministic, window_left, window_right, softcap, alibi_slopes, sinks) = inputs
    out, lse, lse_lo = output
    ctx.save_for_backward(q, k, v, out, lse, lse_lo, mask, seed, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks)
    ctx.options = dict(scale=scale, causal=causal, dropout_p=dropout_p, max_seqlen_q=max_seqlen_q,
                       max_seqlen_k=max_seqlen_k, deterministic=deterministic, window=(window_left, window_right),
                       softcap=softcap)
    ctx.mark_non_differentiable(lse, lse_lo)


def attention_backward(ctx, dout, _dlse, _dlse_lo):
    """torch.ops.engine.attention_fwd's backward: the attention_bwd kernel, or the eager reference
    under create_graph. Gradients for q, k, v and the sinks."""
    q, k, v, out, lse, lse_lo, mask, seed, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a backward that can itself be differentiated
        dq, dk, dv, dsinks = _differentiable_backward(ctx, dout, q, k, v, mask, seed, cu_seqlens_q, cu_seqlens_k,
                                                      alibi_slopes, sinks)
    else:
        o = ctx.options
        import engine.ops.library as library

        dq, dk, dv, dsinks = library.attention_bwd(
            dout, q, k, v, out, lse, lse_lo, mask, o["scale"], o["causal"], o["dropout_p"], seed, cu_seqlens_q,
            cu_seqlens_k, o["max_seqlen_q"], o["max_seqlen_k"], o["deterministic"], *o["window"], o["softcap"],
            alibi_slopes, sinks)
        dsinks = dsinks if sinks is not None and ctx.needs_input_grad[17] else None
    return dq, dk, dv, *([None] * 14), dsinks


def _differentiable_backward(ctx, dout, q, k, v, mask, seed, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                             sinks) -> list:
    """dq, dk, dv, dsinks as torch ops of the saved inputs (connected to the graph under
    create_graph): the eager reference recomputes the forward, with the kernel's own dropout mask."""
    o = ctx.options
    variants = dict(window=None if o["window"] == NO_WINDOW else o["window"], softcap=o["softcap"],
                    alibi_slopes=alibi_slopes, sinks=sinks)
    # one view per argument, so that q, k and v given as one tensor get their own gradients
    q, k, v = (t.view_as(t) for t in (q, k, v))
    sinks = variants["sinks"] = None if sinks is None else sinks.view_as(sinks)
    if cu_seqlens_q is None:
        keep = None
        if o["dropout_p"] > 0:
            keep = backend.kernels().dropout_keep_mask(seed, q.shape[0], q.shape[1], q.shape[2], k.shape[2],
                                                       o["dropout_p"], q.device)
        out, _ = attention_reference(q, k, v, causal=o["causal"], attn_mask=mask, scale=o["scale"],
                                     dropout_keep=keep, dropout_p=o["dropout_p"], **variants)
    else:
        keep = None
        if o["dropout_p"] > 0:
            keep = _varlen_keep_masks(seed, q.shape[1], cu_seqlens_q, cu_seqlens_k, o["max_seqlen_k"],
                                      o["dropout_p"], q.device)
        out, _ = varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=o["causal"], scale=o["scale"],
                                  dropout_p=o["dropout_p"], dropout_keep=keep, **variants)
    needed = (*ctx.needs_input_grad[:3], sinks is not None and ctx.needs_input_grad[17])
    inputs = [t for t, need in zip((q, k, v, sinks), needed) if need]
    grads = iter(torch.autograd.grad(out, inputs, dout, create_graph=True, allow_unused=True))
    return [next(grads) if need else None for need in needed]


def _varlen_keep_masks(seed: torch.Tensor, heads: int, cu_seqlens_q, cu_seqlens_k, max_seqlen_k: int, dropout_p: float,
                       device) -> list[torch.Tensor]:
    """Per sequence b, the (1, Hq, Sq_b, Sk_b) keep mask the packed kernel applied: seeds
    seed + b * Hq + head, rows numbered by packed token, max_seqlen_k keys per row."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    masks = []
    for b in range(len(starts_q) - 1):
        rows = backend.kernels().dropout_keep_mask(seed + b * heads, 1, heads, starts_q[b + 1], max_seqlen_k,
                                                   dropout_p, device)
        masks.append(rows[:, :, starts_q[b]:, :starts_k[b + 1] - starts_k[b]])
    return masks


def _is_plain(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory holds its values: a torch.Tensor, an nn.Parameter, or a subclass
    that overrides neither ``__torch_function__`` nor ``__torch_dispatch__``."""
    cls = type(t)
    function = getattr(cls.__torch_function__, "__func__", cls.__torch_function__)
    return function in _PLAIN_TORCH_FUNCTION and cls.__torch_dispatch__ is torch.Tensor.__torch_dispatch__


def _is_causal_bias(mask: torch.Tensor) -> bool:
    """Whether ``mask`` is torch's CausalBias (imported only for subclasses: it imports torch._dynamo,
    and with it Triton, which must not load before TRITON_INTERPRET is settled)."""
    if _is_plain(mask):
        return False
    from torch.nn.attention.bias import CausalBias

    return isinstance(mask, CausalBias)


def _kernel_refusal(kernels: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: torch.Tensor | None, alibi_slopes: torch.Tensor | None = None,
                    sinks: torch.Tensor | None = None) -> str | None:
    """Why the kernel cannot take these (already validated) arguments, or None."""
    attention = kernels.attention
    for name, t in (("query", q), ("key", k), ("value", v), ("attn_mask", attn_mask), ("alibi_slopes", alibi_slopes),
                    ("sinks", sinks)):
        if t is not None and type(t) is not torch.Tensor and not _is_plain(t):
            return f"{name} is a {type(t).__name__}, a tensor subclass whose memory the kernel cannot read"
    if q.dtype not in attention.ATTENTION_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16, float32)"
    if q.dtype == torch.bfloat16 and kernels.INTERPRETED:
        return "bfloat16 under Triton's interpreter, whose bf16 tl.dot gives wrong numbers (bf16 runs on a GPU)"
    if v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} differs from the query's {q.shape[-1]}"
    if not attention.MIN_HEAD_DIM <= q.shape[-1] <= attention.MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} outside [{attention.MIN_HEAD_DIM}, {attention.MAX_HEAD_DIM}]"
    if attn_mask is not None and attn_mask.requires_grad:
        return "attn_mask requires grad (the kernel gives no mask gradient)"
    if alibi_slopes is not None and alibi_slopes.requires_grad:
        return "alibi_slopes requires grad (the kernel gives no slope gradient)"
    return None


def _causal_alignment(causal: bool | str) -> str | None:
    if causal is False or causal is None:
        return None
    if causal is True:
        return "top_left"
    if causal not in CAUSAL_ALIGNMENTS:
        raise InvalidArgument(f"causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}")
    return causal


def _check_qkv(op: str, query, key, value, *, gqa: bool) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise InvalidDtype(f"{op}: {name} must be floating point, got {t.dtype}")
    if not query.dtype == key.dtype == value.dtype:
        raise InvalidDtype(f"{op}: query, key and value must share a dtype, got {query.dtype}, {key.dtype}, "
                           f"{value.dtype}")
    if not query.device == key.device == value.device:
        raise InvalidArgument(f"{op}: query, key and value must be on one device, got {query.device}, {key.device}, "
                              f"{value.device}")
    if query.shape[-1] != key.shape[-1]:
        raise InvalidArgument(f"{op}: query and key head dims differ: {query.shape[-1]} and {key.shape[-1]}")
    if key.shape[:-1] != value.shape[:-1]:
        raise InvalidArgument(f"{op}: key {tuple(key.shape)} and value {tuple(value.shape)} must agree but for the "
                              "last dimension")
    if gqa and query.dim() >= 4 and (query.shape[-3] % key.shape[-3] if key.shape[-3] else query.shape[-3]):
        raise InvalidArgument(f"{op}: query heads ({query.shape[-3]}) must be a multiple of key/value heads "
                              f"({key.shape[-3]})")


def check_padded_qkv(op: str, query, key, value) -> None:
    """query (B, Hq, Sq, D) and key, value (B, Hkv, Sk, D), Hq a multiple of Hkv."""
    _check_qkv(op, query, key, value, gqa=True)
    if query.dim() != 4 or key.dim() != 4:
        raise InvalidArgument(f"{op}: query and key must be 4-D (batch, heads, seq, head_dim), got "
                              f"{tuple(query.shape)} and {tuple(key.shape)}")
    if query.shape[0] != key.shape[0]:
        raise InvalidArgument(f"{op}: query and key batch sizes differ: {query.shape[0]} and {key.shape[0]}")


def _resolve_mask(op: str, attn_mask: torch.Tensor | None, causal: str | None, shape: tuple[int, ...],
                  device) -> tuple[torch.Tensor | None, str | None]:
    """(the mask the kernel reads, the causal alignment) for a mask broadcastable to the scores'
    ``shape`` (..., Sq, Sk): a CausalBias becomes its alignment (its storage is never read);
    other masks are checked and kept, beside ``causal``."""
    if attn_mask is None:
        return None, causal
    if _is_causal_bias(attn_mask):
        if causal is not None:
            raise InvalidArgument(f"{op}: a CausalBias attn_mask is causal already; do not also pass causal")
        seqlen_q, seqlen_k = shape[-2:]
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (seqlen_q, seqlen_k):
            raise InvalidArgument(f"{op}: attn_mask is a CausalBias for {attn_mask.seq_len_q} queries and "
                                  f"{attn_mask.seq_len_kv} keys, but query and key have {seqlen_q} and {seqlen_k}")
        upper_left = attn_mask.variant.name == "UPPER_LEFT" or seqlen_q == seqlen_k
        return None, "top_left" if upper_left else "bottom_right"
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise InvalidDtype(f"{op}: attn_mask must be bool or floating point, got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise InvalidArgument(f"{op}: attn_mask is on {attn_mask.device} but query is on {device}")
    try:
        torch.broadcast_shapes(attn_mask.shape, shape)
    except RuntimeError:
        raise InvalidArgument(f"{op}: attn_mask of shape {list(attn_mask.shape)} does not broadcast to the scores' "
                              f"shape {list(shape)}") from None
    return attn_mask, causal


def _check_window(op: str, window_size) -> tuple[int, int] | None:
    """FlashAttention's ``window_size`` (left, right), -1 for no limit, as the kernels' window
    (None for (-1, -1): no window)."""
    if window_size is None:
        return None
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(side, int) and not isinstance(side, bool) and side >= -1 for side in window_size)):
        raise InvalidArgument(f"{op}: window_size must be (left, right), each an int >= 0 or -1 for no limit, got "
                              f"{window_size!r}")
    return None if tuple(window_size) == (-1, -1) else tuple(window_size)


def _check_softcap(op: str, softcap) -> float:
    """FlashAttention's ``softcap``: 0 for none, else a positive finite number."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 <= softcap < math.inf:
        raise InvalidArgument(f"{op}: softcap must be a finite number >= 0 (0: no softcapping), got {softcap!r}")
    return float(softcap)


def _check_alibi(op: str, alibi_slopes, batch: int, heads: int, device) -> torch.Tensor | None:
    """FlashAttention's ``alibi_slopes``: (heads,) or (batch, heads), as float32."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.is_floating_point():
        raise InvalidArgument(f"{op}: alibi_slopes must be a floating-point tensor, got "
                              f"{getattr(alibi_slopes, 'dtype', type(alibi_slopes).__name__)}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise InvalidArgument(f"{op}: alibi_slopes must have shape ({heads},) or ({batch}, {heads}) (query heads), "
                              f"got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise InvalidArgument(f"{op}: alibi_slopes is on {alibi_slopes.device} but query is on {device}")
    return alibi_slopes.float()


def _check_sinks(op: str, sinks, heads: int, device) -> torch.Tensor | None:
    """gpt-oss's attention sinks: one logit per query head, (heads,), differentiable."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or tuple(sinks.shape) != (heads,):
        raise InvalidArgument(f"{op}: sinks must be a floating-point tensor of shape ({heads},) (one logit per query "
                              f"head), got {getattr(sinks, 'dtype', type(sinks).__name__)} "
                              f"{tuple(getattr(sinks, 'shape', ()))}")
    if sinks.device != device:
        raise InvalidArgument(f"{op}: sinks is on {sinks.device} but query is on {device}")
    return sinks.contiguous()


def _deterministic(deterministic: bool | None) -> bool:
    return torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)


def _check_dropout(op: str, dropout_p: float) -> None:
    if not 0.0 <= dropout_p <= 1.0:
        raise InvalidArgument(f"{op}: dropout_p must be in [0, 1], got {dropout_p}")


def flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal: bool | str = False,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_lse: bool = False,
    generator: torch.Generator | None = None,
    deterministic: bool | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
):
    """Fused attention of query (B, Hq, Sq, D) over key/value (B, Hkv, Sk, D), Hq a multiple of Hkv.

    ``causal``: False, True / "top_left" (as torch), or "bottom_right". ``attn_mask``: bool (True
    = attend) or additive, broadcastable to (B, Hq, Sq, Sk), or a CausalBias. ``window_size``:
    FlashAttention's sliding window (left, right): query i sees key j only when -left <= j - i -
    offset <= right (-1: no limit on that side), offset 0 or Sk - Sq as ``causal`` aligns, and
    Sk - Sq (bottom-right, as FlashAttention) without ``causal``; the kernel skips the key tiles
    outside every row's window, so its work grows linearly with the sequence. ``softcap`` > 0
    (FlashAttention's, Gemma 2's): scores -> softcap * tanh(scores / softcap), after the scale
    and before any mask, in forward and backward. ``alibi_slopes`` (FlashAttention's; BLOOM, MPT):
    (Hq,) or (B, Hq) slopes, the score of query i and key j gaining -slope * |j - i - offset|
    (offset as for the window), computed in the kernel, no gradient. ``sinks`` (gpt-oss's):
    (Hq,) logits, one per head, each joining its rows' softmax as a key with no value (in the
    log-sum-exp too), differentiable. Dropout draws its
    seed from ``generator`` (default: PyTorch's). ``deterministic``: the backward's scheme (None:
    ``torch.are_deterministic_algorithms_enabled()``; False, FlashAttention-2's atomics, is faster;
    True repeats bit for bit). Returns out (B, Hq, Sq, D), and with
    ``return_lse`` the (B, Hq, Sq) float32 log-sum-exp of the scaled, masked scores too (+inf for
    empty rows).
    """
    op = "flash_attention"
    check_padded_qkv(op, query, key, value)
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    mask, alignment = _resolve_mask(op, attn_mask, _causal_alignment(causal), shape, query.device)
    _check_dropout(op, dropout_p)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    window, softcap = _check_window(op, window_size), _check_softcap(op, softcap)
    alibi_slopes = _check_alibi(op, alibi_slopes, shape[0], shape[1], query.device)
    sinks = _check_sinks(op, sinks, shape[1], query.device)
    if backend.choose(op, query.device, _kernel_refusal, query, key, value, mask, alibi_slopes, sinks) == "torch":
        keep = None
        if dropout_p > 0:
            keep = torch.rand(shape, generator=generator).to(query.device) >= dropout_p
        out, lse = attention_reference(query, key, value, causal=alignment, attn_mask=mask, scale=scale,
                                       dropout_keep=keep, dropout_p=dropout_p, window=window, softcap=softcap,
                                       alibi_slopes=alibi_slopes, sinks=sinks)
    else:
        import engine.ops.library as library  # registers torch.ops.engine.* on first use (it imports Triton)

        seed = dropout_seed(query.device, generator) if dropout_p > 0 else None
        out, lse, _ = library.attention_fwd(query, key, value, mask, scale, alignment, dropout_p, seed,
                                            None, None, None, None, _deterministic(deterministic),
                                            *(NO_WINDOW if window is None else window), softcap, alibi_slopes, sinks)
    return (out, lse) if return_lse else out


def _check_cu_seqlens(op: str, name: str, cu: torch.Tensor, total: int, longest: int) -> None:
    """The table must rise from 0 to ``total`` with no sequence over ``longest``. On the host for
    CPU tensors; on a GPU, and under torch.compile, an asynchronous device-side assert, so no host
    synchronisation and no graph break."""
    if cu.device.type != "cuda" and not torch.compiler.is_compiling():
        starts = cu.tolist()
        lengths = [b - a for a, b in zip(starts, starts[1:])]
        if starts[0] != 0 or starts[-1] != total or min(lengths) < 0:
            raise InvalidArgument(f"{op}: {name} must rise from 0 to the {total} packed tokens, got {starts}")
        if max(lengths) > longest:
            raise InvalidArgument(f"{op}: max_seqlen_{name[-1]}={longest} is shorter than a sequence of "
                                  f"{max(lengths)} tokens")
        return
    lengths = cu[1:] - cu[:-1]
    valid = (cu[0] == 0) & (cu[-1] == total) & (lengths >= 0).all() & (lengths <= longest).all()
    torch._assert_async(valid, f"{op}: {name} must rise from 0 to the {total} packed tokens with no sequence "
                               f"longer than max_seqlen_{name[-1]}={longest}")


def flash_attn_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool | str = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_lse: bool = False,
    generator: torch.Generator | None = None,
    deterministic: bool | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
):
    """Attention over packed sequences: query (total_q, Hq, D), key/value (total_k, Hkv, D); sequence
    b holds tokens cu_seqlens[b]:cu_seqlens[b + 1] (int32, B + 1 entries). The kernel's work
    follows the real lengths (blocks past a sequence's end exit at once); the result equals the
    padded computation. ``deterministic``, ``window_size`` (per sequence), ``softcap``,
    ``alibi_slopes`` ((Hq,) or (B, Hq), per sequence) and ``sinks`` as for ``flash_attention``. Returns out (total_q, Hq, D)
    [, lse (Hq, total_q)]."""
    op = "flash_attn_varlen"
    _check_qkv(op, query, key, value, gqa=False)
    if query.dim() != 3 or key.dim() != 3:
        raise InvalidArgument(f"{op}: query and key must be 3-D (total_tokens, heads, head_dim), got "
                              f"{tuple(query.shape)} and {tuple(key.shape)}")
    if query.shape[1] % key.shape[1] if key.shape[1] else query.shape[1]:
        raise InvalidArgument(f"{op}: query heads ({query.shape[1]}) must be a multiple of key/value heads "
                              f"({key.shape[1]})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 2:
            raise InvalidArgument(f"{op}: {name} must be a 1-D int32 tensor of B + 1 sequence starts, got "
                                  f"{cu.dtype} {tuple(cu.shape)}")
        if cu.device != query.device:
            raise InvalidArgument(f"{op}: {name} is on {cu.device} but query is on {query.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise InvalidArgument(f"{op}: cu_seqlens_q and cu_seqlens_k must have the same length")
    _check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, query.shape[0], max_seqlen_q)
    _check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, key.shape[0], max_seqlen_k)
    alignment = _causal_alignment(causal)
    _check_dropout(op, dropout_p)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    window, softcap = _check_window(op, window_size), _check_softcap(op, softcap)
    alibi_slopes = _check_alibi(op, alibi_slopes, cu_seqlens_q.numel() - 1, query.shape[1], query.device)
    sinks = _check_sinks(op, sinks, query.shape[1], query.device)
    if backend.choose(op, query.device, _kernel_refusal, query, key, value, None, alibi_slopes, sinks) == "torch":
        out, lse = varlen_reference(query, key, value, cu_seqlens_q, cu_seqlens_k, causal=alignment, scale=scale,
                                    dropout_p=dropout_p, generator=generator, window=window, softcap=softcap,
                                    alibi_slopes=alibi_slopes, sinks=sinks)
    else:
        import engine.ops.library as library

        seed = dropout_seed(query.device, generator) if dropout_p > 0 else None
        out, lse, _ = library.attention_fwd(query, key, value, None, scale, alignment, dropout_p, seed,
                                            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            _deterministic(deterministic), *(NO_WINDOW if window is None else window),
                                            softcap, alibi_slopes, sinks)
    return (out, lse) if return_lse else out


def _sdpa_refusal(kernels: ModuleType, query, key, value, mask, enable_gqa) -> str | None:
    if query.dim() < 3 or key.dim() != query.dim():
        return f"query and key must both have 3 or more dims, got {query.dim()} and {key.dim()}"
    if query.dim() >= 4:
        if key.shape[:-3] != query.shape[:-3]:
            return f"batch dims differ: query {tuple(query.shape[:-3])}, key {tuple(key.shape[:-3])}"
        if query.shape[-3] != key.shape[-3] and not enable_gqa:
            return f"query has {query.shape[-3]} heads, key {key.shape[-3]}, and enable_gqa is False"
    elif key.shape[:-2] != query.shape[:-2]:
        return f"batch dims differ: query {tuple(query.shape[:-2])}, key {tuple(key.shape[:-2])}"
    if mask is not None and _is_plain(mask) and _sdpa_mask_4d(mask, query, key) is None:
        return f"attn_mask of shape {tuple(mask.shape)} cannot be viewed as (batch, heads, L, S) without a copy"
    return _kernel_refusal(kernels, query, key, value, mask)


def _prepare_sdpa(op: str, query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """Validate an SDPA call: (the kernel's mask, causal alignment)."""
    _check_qkv(op, query, key, value, gqa=enable_gqa)
    _check_dropout(op, dropout_p)
    alignment = "top_left" if is_causal else None
    if attn_mask is None:
        return None, alignment
    if is_causal and not _is_causal_bias(attn_mask):
        raise InvalidArgument(f"{op}: pass either attn_mask or is_causal=True, not both")
    return _resolve_mask(op, attn_mask, alignment, (*query.shape[:-1], key.shape[-2]), query.device)


def explain_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> str | None:
    """Why ``scaled_dot_product_attention`` with these arguments would take PyTorch's path instead
    of the kernel (whatever the backend), or None when the kernel takes them."""
    mask, _ = _prepare_sdpa("explain_sdpa", query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    return backend.capability(_sdpa_refusal, query, key, value, mask, enable_gqa)


def _as_4d(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each (N, ..., H, L, E) -> (B, H, L, E); (N, L, E) -> (N, 1, L, E)."""
    return [t.unsqueeze(1) if t.dim() == 3 else t.reshape(math.prod(t.shape[:-3]), *t.shape[-3:]) for t in tensors]


def _sdpa_mask_4d(attn_mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """The mask as a (B, Hq, L, S) view (stride 0 where broadcast), or None if that needs a copy."""
    scores_shape = (*query.shape[:-1], key.shape[-2])  # (N, ..., Hq, L, S)
    expanded = attn_mask.expand(scores_shape)
    try:
        return expanded.unsqueeze(1) if query.dim() == 3 else expanded.view(math.prod(scores_shape[:-3]),
                                                                            *scores_shape[-3:])
    except RuntimeError:
        return None


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """As ``torch.nn.functional.scaled_dot_product_attention``: query (N, ..., Hq, L, E), key
    (N, ..., H, S, E), value (N, ..., H, S, Ev) -> (N, ..., Hq, L, Ev). What the kernel cannot do
    takes PyTorch's path (``explain_sdpa`` says why); under backend "triton" that raises instead."""
    op = "scaled_dot_product_attention"
    mask, alignment = _prepare_sdpa(op, query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if backend.choose(op, query.device, _sdpa_refusal, query, key, value, mask, enable_gqa) == "torch":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    mask = None if mask is None else _sdpa_mask_4d(mask, query, key)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    seed = dropout_seed(query.device) if dropout_p > 0 else None
    import engine.ops.library as library

    qkv = (query, key, value) if query.dim() == 4 else _as_4d(query, key, value)
    out, _, _ = library.attention_fwd(*qkv, mask, scale, alignment, dropout_p, seed, None, None, None, None,
                                      torch.are_deterministic_algorithms_enabled(), *NO_WINDOW, 0.0, None, None)
    return out if query.dim() == 4 else out.view_as(query)  # (B, Hq, L, E) back to (N, ..., Hq, L, E)
