"""The engine's kernels as torch.library operators: ``torch.ops.engine.norm_fwd``, ``norm_bwd``,
``attention_fwd``, ``attention_bwd``, ``flex_attention_fwd``, ``flex_attention_bwd``,
``paged_attention``, ``cross_entropy_rows``, ``glu_fwd``, ``glu_bwd``, ``rotary`` and ``rotary_``,
with shape (fake) functions and autograd formulas, so that torch.compile traces a model through
them without a graph break.

On a GPU machine they are ``triton_op``s: torch.compile traces into the Triton launches
themselves. Under Triton's interpreter (which cannot run on fake tensors) they are opaque
``custom_op``s whose shape functions are the launchers run on fake tensors, where nothing is
launched. The flex ops, whose kernels take tuples and Triton functions as arguments, are opaque
``custom_op``s everywhere, with shape functions of their own. Schemas take no optional outputs:
an absent result (h without a residual, the mean of RMSNorm, lse_lo without an additive mask, a
gradient nobody needs) is an empty tensor, which the wrappers turn back into None. Each op's
keyword ``validate`` (default True) checks the launcher's contract; the engine's own front ends,
having checked their arguments, skip it.

The front ends call each op through a ``KernelOp``: the registered op wherever torch must see
the call (torch.compile tracing, a dispatch or function mode such as FakeTensorMode or
FlopCounterMode, functorch transforms), and otherwise its body directly, under an
autograd.Function made of the same formulas when grad mode is on. The dispatcher's Python
autograd layer costs more host time than the launcher itself; benchmarks/test_host.py measures it.

This module is imported on first use of a kernel (engine.ops.norm and engine.ops.attention
import it there; torch.compile runs that import while tracing): registering a triton_op loads
Triton, and whether the ops are triton_ops is settled by TRITON_INTERPRET then, which the CLI
sets after ``import engine``. The autograd formulas live beside each op's front end.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import _C

from engine import kernels
from engine.kernels._launch import INTERPRETED  # the mode the kernels were decorated in

_ABSENT = 0  # the size of the empty 1-D tensor standing in for an absent result


class KernelOp:
    """``torch.ops.engine.<name>`` (``op``), or its ``body`` called without the dispatcher where
    nothing needs the dispatcher: the same results either way (tests/test_compile.py)."""

    def __init__(self, name: str, op, body: Callable):
        self.name, self.op, self.body, self.function = name, op, body, None

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        """Give the op its backward, and the direct path an autograd.Function of the same formulas."""
        self.op.register_autograd(backward, setup_context=setup_context)
        body = self.body

        def forward(ctx, *inputs):
            output = body(*inputs, validate=False)
            setup_context(ctx, inputs, output)
            return output

        def function_backward(ctx, *grads):  # an autograd.Function takes None, not a list, for a list input
            return tuple(None if isinstance(grad, list) else grad for grad in backward(ctx, *grads))

        lists = any(isinstance(argument.type, torch.ListType) for argument in self.op._opoverload._schema.arguments)
        self.function = type(f"{self.name}_function", (torch.autograd.Function,),
                             {"forward": staticmethod(forward),
                              "backward": staticmethod(function_backward if lists else backward)})

    def __call__(self, *args):
        if (torch.compiler.is_compiling() or _C._len_torch_dispatch_stack() or _C._is_torch_function_mode_enabled()
                or _C._are_functorch_transforms_active()):
            return self.op(*args)  # traced, or watched: through torch's dispatcher
        if self.function is not None and _C.is_grad_enabled() and _C._any_requires_grad(*args):
            return self.function.apply(*args)
        return self.body(*args, validate=False)


def _kernel_op(name: str, mutates: tuple[str, ...] = (), shapes: Callable | None = None):
    """Register the decorated launcher as ``torch.ops.engine.<name>`` (writing the arguments named
    in ``mutates``); return its KernelOp. With ``shapes`` (a function of the same arguments giving
    empty outputs) the op is an opaque custom_op on a GPU too, ``shapes`` its fake function: for
    kernels whose arguments (tuples, Triton functions) torch's tracing of Triton launches cannot
    take."""
    def register(function):
        if INTERPRETED or shapes is not None:
            op = torch.library.custom_op(f"engine::{name}", mutates_args=mutates)(function)
            op.register_fake(function if shapes is None else shapes)
        else:
            op = torch.library.triton_op(f"engine::{name}", mutates_args=mutates)(function)
        return KernelOp(name, op, function)
    return register


@_kernel_op("norm_fwd")
def norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
             eps: float, rms: bool, offset: float, casting_mode: str, h_dtype: torch.dtype | None,
             act_dtype: torch.dtype | None, out_dtype: torch.dtype | None, *, validate: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows x (M, N) [+ residual] -> (y, h or absent, mean (LayerNorm) or absent, rstd (M,) fp32)."""
    y, h, mean, rstd = kernels.norm_forward(
        x, weight, bias, residual, eps=eps, rms=rms, offset=offset, casting_mode=casting_mode, h_dtype=h_dtype,
        act_dtype=act_dtype, out_dtype=out_dtype, validate=validate)
    return y, x.new_empty(_ABSENT) if h is None else h, rstd.new_empty(_ABSENT) if mean is None else mean, rstd


@_kernel_op("norm_bwd")
def norm_bwd(dy: torch.Tensor, normed: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
             rstd: torch.Tensor, dh: torch.Tensor | None, bias_dtype: torch.dtype | None, rms: bool, offset: float,
             *, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx like normed, dweight or absent, dbias or absent) from dy and norm_fwd's saved tensors."""
    dx, dweight, dbias = kernels.norm_backward(
        dy, normed, weight, None if rms else mean, rstd, dh, bias_dtype=bias_dtype, rms=rms, offset=offset,
        validate=validate)
    return (dx, dx.new_empty(_ABSENT) if dweight is None else dweight,
            dx.new_empty(_ABSENT) if dbias is None else dbias)


@_kernel_op("attention_fwd")
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                  causal: str | None, dropout_p: float, seed: torch.Tensor | None,
                  cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                  max_seqlen_q: int | None, max_seqlen_k: int | None, deterministic: bool, window_left: int,
                  window_right: int, softcap: float, alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None,
                  *, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out like q, lse fp32, lse_lo or absent): see engine.kernels.attention_forward.
    ``deterministic`` is the backward's scheme (engine.kernels.attention_backward); window sides
    -2 mean no window (-1: that side unlimited); softcap 0: none."""
    out, lse, lse_lo = kernels.attention_forward(
        q, k, v, scale=scale, causal=causal, mask=mask, dropout_p=dropout_p, seed=seed, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        window=None if (window_left, window_right) == _attention.NO_WINDOW else (window_left, window_right),
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, validate=validate)
    return out, lse, lse.new_empty(_ABSENT) if lse_lo is None else lse_lo


@_kernel_op("attention_bwd")
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, lse_lo: torch.Tensor, mask: torch.Tensor | None, scale: float,
                  causal: str | None, dropout_p: float, seed: torch.Tensor | None,
                  cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                  max_seqlen_q: int | None, max_seqlen_k: int | None, deterministic: bool, window_left: int,
                  window_right: int, softcap: float, alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None,
                  *, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks or absent): see engine.kernels.attention_backward."""
    dq, dk, dv, dsinks = kernels.attention_backward(
        dout, q, k, v, out, lse, scale=scale, lse_lo=lse_lo if lse_lo.dim() > 1 else None, causal=causal,
        mask=mask, dropout_p=dropout_p, seed=seed, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, deterministic=deterministic,
        window=None if (window_left, window_right) == _attention.NO_WINDOW else (window_left, window_right),
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, validate=validate)
    return dq, dk, dv, dq.new_empty(_ABSENT) if dsinks is None else dsinks


@_kernel_op("paged_attention")
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    cache_seqlens: torch.Tensor, scale: float, causal: bool, window_left: int, window_right: int,
                    softcap: float, alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None, *,
                    validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q, lse fp32) over a paged KV cache: see engine.kernels.paged_attention_forward.
    Window sides -2 mean no window; no autograd (inference)."""
    return kernels.attention.paged_attention_forward(
        q, k_cache, v_cache, block_table, cache_seqlens, scale=scale, causal=causal,
        window=None if (window_left, window_right) == _attention.NO_WINDOW else (window_left, window_right),
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, validate=validate)


def _flex_forward_shapes(q, k, v, *args, validate: bool = True):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _flex_backward_shapes(dout, q, k, v, *args, validate: bool = True):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# user functions reach the kernels as tuple and JITFunction arguments: opaque ops, shapes as fake functions
@_kernel_op("flex_attention_fwd", shapes=_flex_forward_shapes)
def flex_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mods: str,
                       block_lists: list[torch.Tensor], block_size: int, score_args: list[torch.Tensor],
                       mask_args: list[torch.Tensor], deterministic: bool, *, validate: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q, lse fp32) of user-defined attention: ``mods`` names the registered score_mod,
    its derivative and mask_mod (engine.ops.flex); ``block_lists`` a block mask's four list
    tensors (empty with block_size 0: no block mask). ``deterministic``: the backward's scheme."""
    out, lse, _ = kernels.attention_forward(
        q, k, v, scale=scale, flex=_flex.flex_for(mods, block_lists, block_size, score_args, mask_args),
        validate=validate)
    return out, lse


@_kernel_op("flex_attention_bwd", shapes=_flex_backward_shapes)
def flex_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, scale: float, mods: str, block_lists: list[torch.Tensor], block_size: int,
                       score_args: list[torch.Tensor], mask_args: list[torch.Tensor], deterministic: bool, *,
                       validate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of flex_attention_fwd."""
    dq, dk, dv, _ = kernels.attention_backward(
        dout, q, k, v, out, lse, scale=scale, deterministic=deterministic,
        flex=_flex.flex_for(mods, block_lists, block_size, score_args, mask_args), validate=validate)
    return dq, dk, dv


@_kernel_op("cross_entropy_rows", mutates=("logits",))
def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None, ignore_index: int,
                       label_smoothing: float, z_loss: float, softcap: float | None, *, validate: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (R,) fp32, lse (R,) fp32) of logits (R, V); with ``scale`` the logits are overwritten
    with the scaled gradient: see engine.kernels.cross_entropy."""
    return kernels.cross_entropy.cross_entropy_rows(
        logits, target, scale, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, validate=validate)


@_kernel_op("glu_fwd")
def glu_fwd(gate: torch.Tensor, up: torch.Tensor, activation: str, *, validate: bool = True) -> torch.Tensor:
    """act(gate) * up of (M, N) rows: see engine.kernels.glu."""
    return kernels.glu.glu_forward(gate, up, activation=activation, validate=validate)


@_kernel_op("glu_bwd")
def glu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str, *, validate: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) from dout and glu_fwd's inputs."""
    return kernels.glu.glu_backward(dout, gate, up, activation=activation, validate=validate)


@_kernel_op("rotary")
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, inverse: bool, *,
           validate: bool = True) -> torch.Tensor:
    """x (B, H, S, D) with rotary embeddings (the transposed rotation when ``inverse``): see
    engine.kernels.rotary."""
    return kernels.rotary.rotary(x, cos, sin, interleaved=interleaved, inverse=inverse, validate=validate)


@_kernel_op("rotary_", mutates=("x",))
def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, *, validate: bool = True) -> None:
    """``rotary`` written over x itself (no autograd: for tensors nothing will differentiate)."""
    kernels.rotary.rotary(x, cos, sin, interleaved=interleaved, out=x, validate=validate)


# The backward formulas (kernels, or the eager reference under create_graph) beside each op's front end.
from engine.ops import (  # noqa: E402  (all loaded by now)
    attention as _attention, flex as _flex, glu as _glu, norm as _norm, rotary as _rotary,
)

norm_fwd.register_autograd(_norm.norm_backward, setup_context=_norm.setup_norm_backward)
attention_fwd.register_autograd(_attention.attention_backward, setup_context=_attention.setup_attention_backward)
flex_attention_fwd.register_autograd(_flex.flex_backward, setup_context=_flex.setup_flex_backward)
glu_fwd.register_autograd(_glu.glu_backward, setup_context=_glu.setup_glu_backward)
rotary.register_autograd(_rotary.rotary_backward, setup_context=_rotary.setup_rotary_backward)
