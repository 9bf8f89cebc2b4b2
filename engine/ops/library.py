"""The engine's kernels as torch.library operators: ``torch.ops.engine.norm_fwd``, ``norm_bwd``,
``attention_fwd`` and ``attention_bwd``, with shape (fake) functions and autograd formulas, so that
torch.compile traces a model through them without a graph break.

On a GPU machine they are ``triton_op``s: torch.compile traces into the Triton launches
themselves. Under Triton's interpreter (which cannot run on fake tensors) they are opaque
``custom_op``s whose shape functions are the launchers run on fake tensors, where nothing is
launched. Schemas take no optional outputs: an absent result (h without a residual, the mean of
RMSNorm, lse_lo without an additive mask, a gradient nobody needs) is an empty tensor, which the
wrappers turn back into None.

This module is imported on first use of a kernel (engine.ops.norm and engine.ops.attention
import it there; torch.compile runs that import while tracing): registering a triton_op loads
Triton, and whether the ops are triton_ops is settled by TRITON_INTERPRET then, which the CLI
sets after ``import engine``. The autograd formulas live beside each op's front end.
"""

from __future__ import annotations

import torch

from engine import backend
from engine.kernels._launch import INTERPRETED  # the mode the kernels were decorated in

_ABSENT = (0,)


def _kernel_op(name: str):
    """Register the decorated launcher as ``torch.ops.engine.<name>``."""
    def register(function):
        if INTERPRETED:
            op = torch.library.custom_op(f"engine::{name}", mutates_args=())(function)
            op.register_fake(function)
            return op
        return torch.library.triton_op(f"engine::{name}", mutates_args=())(function)
    return register


def _or_absent(t: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return like.new_empty(_ABSENT, dtype=dtype or like.dtype) if t is None else t


def present(t: torch.Tensor) -> torch.Tensor | None:
    """None for an absent result (an empty 1-D tensor standing in for it), else ``t``."""
    return None if t.dim() == 1 and t.shape[0] == 0 else t


@_kernel_op("norm_fwd")
def norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
             eps: float, rms: bool, offset: float, casting_mode: str, h_dtype: torch.dtype | None,
             act_dtype: torch.dtype | None, out_dtype: torch.dtype | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows x (M, N) [+ residual] -> (y, h or absent, mean (LayerNorm) or absent, rstd (M,) fp32)."""
    y, h, mean, rstd = backend.kernels().norm_forward(
        x, weight, bias, residual, eps=eps, rms=rms, offset=offset, casting_mode=casting_mode, h_dtype=h_dtype,
        act_dtype=act_dtype, out_dtype=out_dtype)
    return y, _or_absent(h, x), _or_absent(mean, rstd), rstd


@_kernel_op("norm_bwd")
def norm_bwd(dy: torch.Tensor, normed: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
             rstd: torch.Tensor, dh: torch.Tensor | None, bias_dtype: torch.dtype | None, rms: bool, offset: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx like normed, dweight or absent, dbias or absent) from dy and norm_fwd's saved tensors."""
    dx, dweight, dbias = backend.kernels().norm_backward(
        dy, normed, weight, None if rms else mean, rstd, dh, bias_dtype=bias_dtype, rms=rms, offset=offset)
    return dx, _or_absent(dweight, dx), _or_absent(dbias, dx)


@_kernel_op("attention_fwd")
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                  causal: str | None, dropout_p: float, seed: torch.Tensor | None,
                  cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                  max_seqlen_q: int | None, max_seqlen_k: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out like q, lse fp32, lse_lo or absent): see engine.kernels.attention_forward."""
    out, lse, lse_lo = backend.kernels().attention_forward(
        q, k, v, scale=scale, causal=causal, mask=mask, dropout_p=dropout_p, seed=seed, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    return out, lse, _or_absent(lse_lo, lse)


@_kernel_op("attention_bwd")
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, lse_lo: torch.Tensor, mask: torch.Tensor | None, scale: float,
                  causal: str | None, dropout_p: float, seed: torch.Tensor | None,
                  cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                  max_seqlen_q: int | None, max_seqlen_k: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv): see engine.kernels.attention_backward."""
    return backend.kernels().attention_backward(
        dout, q, k, v, out, lse, scale=scale, lse_lo=present(lse_lo), causal=causal, mask=mask, dropout_p=dropout_p,
        seed=seed, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k)


# The backward formulas (kernels, or the eager reference under create_graph) beside each op's front end.
from engine.ops import attention as _attention, norm as _norm  # noqa: E402  (both are loaded by now)

norm_fwd.register_autograd(_norm.norm_backward, setup_context=_norm.setup_norm_backward)
attention_fwd.register_autograd(_attention.attention_backward, setup_context=_attention.setup_attention_backward)
