"""User-defined attention without torch.compile: PyTorch FlexAttention's API (``flex_attention``,
``create_block_mask``, ``BlockMask``), with the score and mask functions written as
``@triton.jit`` functions and compiled into the engine's fused kernels.

    @triton.jit
    def causal(batch, head, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = create_block_mask(causal, None, None, 4096, 4096, device="cuda")
    out = flex_attention(q, k, v, block_mask=block_mask)

A mask_mod is a function of (batch, head, q_idx, kv_idx) returning True where a query may
attend; a score_mod one of (score, batch, head, q_idx, kv_idx) returning the new score, where
score = scale * q.k (fp32, natural-log units), q_idx is (BLOCK_M, 1), kv_idx (1, BLOCK_N), int32
positions within the sequence, batch and head scalars. Tensors they read (document ids, a bias
table) are passed as ``mask_mod_args`` / ``score_mod_args``, a tuple the function takes as its
last argument. The gradient flows through what a score_mod computes from the score: by its
``score_mod_grad`` (d score_mod / d score, same arguments), or as 1 without one (a bias added
to the score), which a probe of the score_mod by finite differences confirms on its first use
with gradients. engine.kernels.attention.mods holds the usual mods.

The block mask evaluates the mask_mod once over blocks of BLOCK_SIZE x BLOCK_SIZE scores: the
kernels never visit the blocks it hides, and skip the mask arithmetic in the blocks it shows
whole (engine.kernels.attention.flex).
"""

from __future__ import annotations

import math

import torch

from engine import backend
from engine.errors import InvalidArgument
from engine.ops.attention import _is_plain, _kernel_refusal, check_padded_qkv

_MODS: dict[str, tuple] = {}  # registry key -> (score_mod, score_mod_grad, mask_mod): the ops take the key
_PROBED: set[str] = set()  # registry keys whose score_mod derivative was checked


class BlockMask:
    """The blocks of a mask_mod that attention visits: built by ``create_block_mask``.

    ``shape`` (B, H, Q_LEN, KV_LEN), B and H 1 where the mask is shared across batch entries or
    heads; ``BLOCK_SIZE``; ``states`` (B, H, blocks_q, blocks_k) int8: 0 nothing visible (never
    visited), 1 partial (the mask_mod evaluated inside), 2 full (no mask arithmetic);
    ``mask_mod`` and ``mask_mod_args`` (what partial blocks evaluate)."""

    def __init__(self, mask_mod, mask_mod_args: tuple, shape: tuple[int, int, int, int], block_size: int,
                 states: torch.Tensor):
        flex = backend.kernels().attention.flex
        self.mask_mod, self.mask_mod_args = mask_mod, tuple(mask_mod_args)
        self.shape, self.BLOCK_SIZE, self.states = shape, block_size, states
        self.rows = flex.block_lists(states)  # by query block: the key blocks to visit
        self.cols = flex.block_lists(states.transpose(-1, -2))  # by key block: the query blocks

    def sparsity(self) -> float:
        """The percentage of blocks never visited (a host synchronisation)."""
        return 100.0 * (self.states == 0).sum().item() / max(self.states.numel(), 1)

    def __repr__(self) -> str:
        name = getattr(self.mask_mod, "__name__", type(self.mask_mod).__name__)
        return (f"BlockMask(mask_mod={name}, shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, "
                f"sparsity={self.sparsity():.1f}%)")


def _check_mod(op: str, name: str, fn) -> None:
    """``fn`` must be a Triton function (the kernels compile it in), not a Python one."""
    if fn is None:
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, (JITFunction, InterpretedFunction)):
        raise InvalidArgument(f"{op}: {name} must be a @triton.jit function (the engine compiles it into its "
                              f"kernels; write it with triton.language), got {type(fn).__name__} "
                              f"{getattr(fn, '__name__', fn)!r}")


def _check_mod_args(op: str, name: str, args, device: torch.device) -> tuple[torch.Tensor, ...]:
    if not isinstance(args, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in args):
        raise InvalidArgument(f"{op}: {name} must be a tuple of tensors, got {args!r}")
    for i, t in enumerate(args):
        if t.device != device:
            raise InvalidArgument(f"{op}: {name}[{i}] is on {t.device} but the attention runs on {device}")
        if not _is_plain(t):
            raise InvalidArgument(f"{op}: {name}[{i}] is a {type(t).__name__}, a tensor subclass whose memory the "
                                  "kernel cannot read")
    return tuple(args)


def _require_kernels(op: str, device: torch.device):
    """engine.kernels, where its kernels can run on ``device`` (user mods have no torch path)."""
    if backend.get_backend() == "torch":
        raise InvalidArgument(f"{op}: the backend is 'torch', but score and mask functions run only in the Triton "
                              "kernels")
    kernels = backend.kernels()
    if device.type == "cpu" and not kernels.INTERPRETED:
        raise InvalidArgument(f"{op}: score and mask functions run in the Triton kernels: use CUDA tensors, or set "
                              "TRITON_INTERPRET=1 before importing engine to run them on CPU")
    return kernels


def create_block_mask(mask_mod, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device="cuda",
                      BLOCK_SIZE: int = 128, *, mask_mod_args: tuple = ()) -> BlockMask:
    """FlexAttention's ``create_block_mask``: evaluate ``mask_mod`` (a @triton.jit function of
    (batch, head, q_idx, kv_idx[, mask_mod_args])) once over every BLOCK_SIZE x BLOCK_SIZE block
    of a (B, H, Q_LEN, KV_LEN) score matrix, in one kernel. B or H None: one mask for every batch
    entry or head (the mask_mod sees batch 0 or head 0). BLOCK_SIZE: a power of two >= 128."""
    op = "create_block_mask"
    _check_mod(op, "mask_mod", mask_mod)
    if mask_mod is None:
        raise InvalidArgument(f"{op}: mask_mod must be a @triton.jit function, got None")
    device = torch.device(device)
    sizes = {"B": 1 if B is None else B, "H": 1 if H is None else H, "Q_LEN": Q_LEN, "KV_LEN": KV_LEN}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < (1 if name in ("B", "H") else 0):
            raise InvalidArgument(f"{op}: {name} must be a {'positive' if name in ('B', 'H') else 'non-negative'} "
                                  f"int{' or None' if name in ('B', 'H') else ''}, got {size!r}")
    minimum = backend.kernels().attention.flex.MIN_SPARSE_BLOCK
    if (isinstance(BLOCK_SIZE, bool) or not isinstance(BLOCK_SIZE, int) or BLOCK_SIZE < minimum
            or BLOCK_SIZE & (BLOCK_SIZE - 1)):
        raise InvalidArgument(f"{op}: BLOCK_SIZE must be a power of two >= {minimum} (each kernel tile lies in one "
                              f"block), got {BLOCK_SIZE!r}")
    mask_mod_args = _check_mod_args(op, "mask_mod_args", mask_mod_args, device)
    kernels = _require_kernels(op, device)
    shape = (sizes["B"], sizes["H"], Q_LEN, KV_LEN)
    states = kernels.attention.flex.block_states(mask_mod, mask_mod_args, *shape, BLOCK_SIZE, device)
    return BlockMask(mask_mod, mask_mod_args, shape, BLOCK_SIZE, states)


def _mods_key(score_mod, score_mod_grad, mask_mod) -> str:
    """The registry key the ops take for these functions (registered on first use)."""
    key = ":".join(f"{getattr(fn, '__name__', 'none')}@{id(fn):x}" for fn in (score_mod, score_mod_grad, mask_mod))
    _MODS.setdefault(key, (score_mod, score_mod_grad, mask_mod))
    return key


def flex_for(mods: str, block_lists: list[torch.Tensor], block_size: int, score_args: list[torch.Tensor],
             mask_args: list[torch.Tensor]):
    """The launchers' Flex for the ops' arguments (engine.ops.library)."""
    score_mod, score_grad, mask_mod = _MODS[mods]
    lists = dict(rows=tuple(block_lists[:2]), cols=tuple(block_lists[2:])) if block_size else {}
    return backend.kernels().attention.flex.Flex(score_mod, score_grad, tuple(score_args), mask_mod,
                                                 tuple(mask_args), block_size, **lists)


def _probe_derivative(op: str, key: str, score_args: tuple, seqlen_q: int, seqlen_k: int, device) -> None:
    """Raise if the backward's d score_mod / d score (score_mod_grad, or 1) disagrees with finite
    differences of the score_mod: checked once per registry key, on a 16 x 16 probe."""
    if key in _PROBED or torch.compiler.is_compiling():
        return
    score_mod, score_grad, _ = _MODS[key]
    numeric, analytic = backend.kernels().attention.flex.derivative_probe(
        score_mod, score_grad, score_args, max(seqlen_q, 1), max(seqlen_k, 1), device)
    finite = torch.isfinite(numeric) & torch.isfinite(analytic)
    wrong = finite & ((numeric - analytic).abs() > 0.02 * (1 + analytic.abs()))
    if wrong.any():
        i, j = (int(x) for x in wrong.nonzero()[0])
        used = "score_mod_grad gives" if score_grad is not None else "without score_mod_grad the backward assumes"
        raise InvalidArgument(
            f"{op}: the derivative of score_mod {score_mod.__name__!r} with respect to the score is wrong: at score "
            f"{(i - 2 * j) * 0.21 + 0.05:.3g}, q_idx {min(i, seqlen_q - 1)}, kv_idx {min(j, seqlen_k - 1)} finite "
            f"differences give {numeric[i, j].item():.4g}, {used} {analytic[i, j].item():.4g}; pass score_mod_grad, "
            "its derivative, as a @triton.jit function of the same arguments")
    _PROBED.add(key)


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod=None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    *,
    score_mod_grad=None,
    score_mod_args: tuple = (),
    deterministic: bool | None = None,
):
    """FlexAttention's ``flex_attention`` in the fused kernels, no torch.compile needed: query
    (B, Hq, Sq, D) over key/value (B, Hkv, Sk, D) (Hq a multiple of Hkv with ``enable_gqa``).

    ``score_mod``: None, or a @triton.jit (score, batch, head, q_idx, kv_idx[, score_mod_args])
    -> score, applied to scale * q.k; ``score_mod_grad``: its derivative with respect to the
    score (None: 1, checked). ``block_mask``: from ``create_block_mask`` for (B or 1, Hq or 1,
    Sq, Sk); its hidden blocks are never visited. A row that sees no key gives zeros (FlexAttention
    too) and a log-sum-exp of +inf (FlexAttention's -inf). ``deterministic`` (None: True, as
    FlexAttention's backward): dQ from its own kernel; False: FlashAttention-2's atomics (five
    matmuls a tile, not seven, but with the mods' registers its dK/dV tiles spill on 99 KiB GPUs). Returns out (B, Hq, Sq, D) [, lse (B, Hq, Sq) float32, natural log]. No
    gradient for the mods' tensors, nor a second derivative."""
    op = "flex_attention"
    check_padded_qkv(op, query, key, value)
    batch, heads, seqlen_q, head_dim = query.shape
    if heads != key.shape[1] and not enable_gqa:
        raise InvalidArgument(f"{op}: query has {heads} heads and key {key.shape[1]}: pass enable_gqa=True for "
                              "grouped-query attention")
    _check_mod(op, "score_mod", score_mod)
    _check_mod(op, "score_mod_grad", score_mod_grad)
    if score_mod_grad is not None and score_mod is None:
        raise InvalidArgument(f"{op}: score_mod_grad was given without a score_mod")
    score_mod_args = _check_mod_args(op, "score_mod_args", score_mod_args, query.device)
    seqlen_k = key.shape[2]
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise InvalidArgument(f"{op}: block_mask must come from engine.ops.create_block_mask, got "
                                  f"{type(block_mask).__name__}")
        b, h, q_len, kv_len = block_mask.shape
        if b not in (1, batch) or h not in (1, heads) or (q_len, kv_len) != (seqlen_q, seqlen_k):
            raise InvalidArgument(f"{op}: block_mask was made for (B, H, Q_LEN, KV_LEN) = {block_mask.shape}, but "
                                  f"this call has ({batch}, {heads}, {seqlen_q}, {seqlen_k}) (B and H may be 1)")
        if block_mask.states.device != query.device:
            raise InvalidArgument(f"{op}: block_mask is on {block_mask.states.device} but query is on {query.device}")
    kernels = _require_kernels(op, query.device)
    reason = _kernel_refusal(kernels, query, key, value, None)
    if reason is not None:
        raise InvalidArgument(f"{op}: the kernel cannot run this call: {reason}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    mask_mod_args = () if block_mask is None else block_mask.mask_mod_args
    if needs_grad:
        for name, args in (("score_mod_args", score_mod_args), ("block_mask's mask_mod_args", mask_mod_args)):
            if any(t.requires_grad for t in args):
                raise InvalidArgument(f"{op}: a tensor of {name} requires grad, but the kernels give the mods' "
                                      "tensors no gradient")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    mods = _mods_key(score_mod, score_mod_grad, None if block_mask is None else block_mask.mask_mod)
    if needs_grad and score_mod is not None:
        _probe_derivative(op, mods, score_mod_args, seqlen_q, seqlen_k, query.device)
    block_lists = [] if block_mask is None else [*block_mask.rows, *block_mask.cols]
    import engine.ops.library as library

    out, lse = library.flex_attention_fwd(query, key, value, scale, mods, block_lists,
                                          0 if block_mask is None else block_mask.BLOCK_SIZE,
                                          list(score_mod_args), list(mask_mod_args),
                                          True if deterministic is None else bool(deterministic))
    return (out, lse) if return_lse else out


def setup_flex_backward(ctx, inputs, output, keyword_only_inputs=None) -> None:
    """torch.ops.engine.flex_attention_fwd's autograd context: q, k, v, the output and the
    log-sum-exp (memory linear in Sq), the block lists and the mods' tensors."""
    q, k, v, scale, mods, block_lists, block_size, score_args, mask_args, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *block_lists, *score_args, *mask_args)
    ctx.options = (scale, mods, len(block_lists), block_size, len(score_args), deterministic)
    ctx.mark_non_differentiable(lse)


def flex_backward(ctx, dout, _dlse):
    """torch.ops.engine.flex_attention_fwd's backward: gradients for q, k and v."""
    if torch.is_grad_enabled():
        raise NotImplementedError("flex_attention: no second derivative (create_graph=True) through score and mask "
                                  "functions")
    scale, mods, lists, block_size, scores, deterministic = ctx.options
    q, k, v, out, lse, *rest = ctx.saved_tensors
    import engine.ops.library as library

    dq, dk, dv = library.flex_attention_bwd(dout, q, k, v, out, lse, scale, mods, rest[:lists], block_size,
                                            rest[lists:lists + scores], rest[lists + scores:], deterministic)
    nothing = [None] * lists, [None] * scores, [None] * (len(rest) - lists - scores)  # the list inputs' structure
    return dq, dk, dv, None, None, nothing[0], None, nothing[1], nothing[2], None
