"""``engine.patch(model)``: run a model you already have on the engine's kernels.

One table maps module classes to converters; every converter shares the original parameters
(no copy), so the state_dict is unchanged and ``undo()`` puts the original modules back. Hugging
Face models that use transformers' attention-function registry (BERT, GPT-2, Llama and most
others in transformers 5) also get their attention routed through
``engine.ops.scaled_dot_product_attention`` (sliding windows, soft-capped scores and attention
sinks through ``engine.ops.flash_attention``'s own arguments, the window drawn by the kernel
instead of a dense mask), and those whose modeling module defines
``apply_rotary_pos_emb`` (Llama, Mistral, Qwen2/3, Gemma/2/3, ...) get it replaced there by
``engine.ops.apply_rotary``; causal LMs compute their training loss with
``engine.ops.linear_cross_entropy`` (no full logits). Modules with no entry are left alone and
listed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Callable

import torch

from engine import nn as engine_nn
from engine import ops

ATTENTION_NAME = "engine"


# transformers' activation classes -> the engine's gated units
_GATED_ACTIVATIONS = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
                      "PytorchGELUTanh": "gelu_tanh"}


def _hf_gated_mlp(module: torch.nn.Module) -> engine_nn.GatedMLP | None:
    """A transformers gated MLP (gate_proj, up_proj, down_proj, act_fn) as engine.nn.GatedMLP, or
    None when its activation has no fused kernel."""
    activation = _GATED_ACTIVATIONS.get(type(module.act_fn).__name__)
    if activation is None:
        return None
    return engine_nn.GatedMLP(module.gate_proj, module.up_proj, module.down_proj, activation)


def _hf_rms_norm(module: torch.nn.Module, *, casting_mode: str, offset: float = 0.0) -> engine_nn.RMSNorm:
    """A transformers RMSNorm (``weight`` and ``variance_epsilon`` or ``eps``) as the engine's, with
    that family's numerics: Llama's casts before the weight multiply and promotes the output with
    the weight's dtype ("llama"); Gemma's scales by (1 + w) in fp32 and returns the input's dtype."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    norm = engine_nn.RMSNorm(module.weight.shape, eps=eps, device="meta", offset=offset, casting_mode=casting_mode)
    norm.weight = module.weight  # the same Parameter
    return norm


# Exact classes only: a user's subclass of torch.nn.LayerNorm may change its forward.
REPLACEMENTS: dict[type, Callable[[torch.nn.Module], torch.nn.Module]] = {
    torch.nn.LayerNorm: engine_nn.LayerNorm.from_torch,
    torch.nn.RMSNorm: engine_nn.RMSNorm.from_torch,
    torch.nn.MultiheadAttention: engine_nn.MultiheadAttention.from_torch,
    torch.nn.TransformerEncoderLayer: engine_nn.TransformerEncoderLayer.from_torch,
}
# transformers classes, by name (transformers is optional), each with its family's numerics.
REPLACEMENTS_BY_NAME: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    **dict.fromkeys(("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"),
                    functools.partial(_hf_rms_norm, casting_mode="llama")),
    **dict.fromkeys(("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"),
                    functools.partial(_hf_rms_norm, casting_mode="gemma", offset=1.0)),
    "Olmo2RMSNorm": functools.partial(_hf_rms_norm, casting_mode="gemma"),  # (w * fp32 normalised).to(input dtype)
    **dict.fromkeys(("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP",
                     "Olmo2MLP"), _hf_gated_mlp),
}


def _converter(module: torch.nn.Module) -> Callable | None:
    return REPLACEMENTS.get(type(module)) or (
        REPLACEMENTS_BY_NAME.get(type(module).__name__) if type(module).__module__.startswith("transformers.") else None
    )


def hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                 position_bias=None, sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """transformers' attention-function signature over the engine's kernels: query (B, Hq, L, D),
    key/value (B, Hkv, S, D) -> ((B, L, Hq, D), None), with the causal and mask conventions of
    transformers' "sdpa" function. Sliding windows (Mistral, Gemma 2, gpt-oss), soft-capped
    scores (Gemma 2) and attention sinks (gpt-oss's ``s_aux``) go to ``engine.ops.flash_attention``
    (``_variant_attention``); position biases take transformers' own "sdpa" path."""
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if sliding_window is not None or softcap is not None or s_aux is not None:
        return _variant_attention(query, key, value, attention_mask, dropout, scaling, causal, sliding_window,
                                  softcap, s_aux)
    causal = query.shape[2] > 1 and attention_mask is None and causal
    if causal and key.shape[2] > query.shape[2]:  # as transformers' sdpa: causal without a cache
        key, value = key[:, :, :query.shape[2]], value[:, :, :query.shape[2]]
    out = ops.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                           is_causal=causal, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _variant_attention(query, key, value, attention_mask, dropout, scaling, causal, sliding_window, softcap, sinks):
    """``hf_attention`` for a layer with a sliding window, a softcap or sinks. With no mask a
    sliding-window layer's queries end at its last key (``hf_attention_mask`` gave None for just
    that), so the kernel's own window (left ``sliding_window - 1``, bottom-right) replaces the
    dense mask and skips the key tiles outside it; any mask given (padding, a static cache's
    empty slots) is read as it is, already windowed."""
    window = None
    if attention_mask is None and causal:
        if sliding_window is not None:
            window = (sliding_window - 1, 0)
        elif key.shape[2] > query.shape[2] > 1:  # sdpa's causal skip with a static cache's empty slots
            key, value = key[:, :, :query.shape[2]], value[:, :, :query.shape[2]]
    mask = None if attention_mask is None else attention_mask[..., :key.shape[2]]
    out = ops.flash_attention(query, key, value, causal="bottom_right" if mask is None and causal else False,
                              attn_mask=mask, dropout_p=dropout, scale=scaling, window_size=window,
                              softcap=softcap or 0.0, sinks=sinks)
    return out.transpose(1, 2).contiguous(), None


def hf_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, *args, attention_mask=None,
                      local_size=None, allow_is_causal_skip=True, **kwargs):
    """transformers' "sdpa" masks (``masking_utils.sdpa_mask``), except for a causal sliding-window
    layer (``local_size``) whose queries end at its last key with no padding: None, which
    ``hf_attention`` answers with the kernel's window. Other sliding-window masks are always
    built (never None), so that a None always means that alignment."""
    from transformers.masking_utils import sdpa_mask

    if local_size is not None and allow_is_causal_skip and isinstance(q_offset, int) and isinstance(kv_offset, int):
        padding = None if attention_mask is None else attention_mask[:, kv_offset:kv_offset + kv_length]
        if q_offset + q_length == kv_offset + kv_length and (
                padding is None or (not torch.compiler.is_compiling() and bool(padding.all()))):
            return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, *args, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip and local_size is None,
                     **kwargs)


def hf_apply_rotary_pos_emb(original: Callable, q, k, cos, sin, *args, **kwargs):
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` over
    engine.ops.apply_rotary for q, k (B, H, S, D) and cos, sin (B, S, R); any other layout (an
    unsqueeze_dim other than 1, or older signatures' position_ids) takes the original."""
    unsqueeze_dim = kwargs.get("unsqueeze_dim", args[-1] if args else 1)
    if unsqueeze_dim != 1 or len(args) > 1 or set(kwargs) - {"unsqueeze_dim"} or q.dim() != 4 or cos.dim() != 3:
        return original(q, k, cos, sin, *args, **kwargs)
    return ops.apply_rotary(q, k, cos, sin)


def _patch_rotary(model: torch.nn.Module) -> list[tuple[object, Callable]]:
    """Replace ``apply_rotary_pos_emb`` in the transformers modeling modules that ``model``'s
    attention modules come from; returns (module, original) pairs for undo."""
    import sys

    patched = []
    for name in dict.fromkeys(type(m).__module__ for m in model.modules() if type(m).__name__.endswith("Attention")):
        module = sys.modules.get(name)
        original = getattr(module, "apply_rotary_pos_emb", None)
        if name.startswith("transformers.") and callable(original) and not isinstance(original, functools.partial):
            module.apply_rotary_pos_emb = functools.partial(hf_apply_rotary_pos_emb, original)
            patched.append((module, original))
    return patched


class _HiddenStates(torch.nn.Module):
    """Stands in for ``lm_head`` during a fused-loss forward: the "logits" it gives are its input."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def hf_causal_lm_forward(model: torch.nn.Module, original: Callable, *args, labels=None, **kwargs):
    """A transformers causal LM's own forward with its loss from engine.ops.linear_cross_entropy:
    in training, with labels, ``lm_head`` gives the final hidden states for the call, so no
    (B, S, vocabulary) logits are made; the loss is transformers' (labels shifted, -100 ignored,
    a mean, or a sum over ``num_items_in_batch``), with Gemma 2's final logit softcap, and the
    output's logits are None. Otherwise (no labels, eval mode, shift_labels, logits_to_keep,
    return_dict=False) the original runs unchanged."""
    head = model.lm_head
    if (labels is None or not model.training or kwargs.get("shift_labels") is not None
            or kwargs.get("logits_to_keep", 0) or kwargs.get("return_dict") is False
            or not isinstance(head, torch.nn.Linear)):
        return original(*args, labels=labels, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    model.lm_head = _HiddenStates()
    if softcap is not None:
        config.final_logit_softcapping = None
    try:
        out = original(*args, **kwargs)
    finally:
        model.lm_head = head
        if softcap is not None:
            config.final_logit_softcapping = softcap
    hidden = out.logits  # (B, S, E): the final hidden states
    loss = ops.linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:].to(hidden.device), head.bias,
                                    reduction="mean" if num_items is None else "sum", softcap=softcap,
                                    loss_dtype=torch.float32)
    out.loss = loss if num_items is None else loss / num_items
    out.logits = None
    return out


def _patch_causal_lm(model: torch.nn.Module) -> bool:
    """Give a transformers causal LM (``*ForCausalLM``, ``*LMHeadModel`` with a Linear lm_head) the
    fused loss; True if it was."""
    name = type(model).__name__
    if (not type(model).__module__.startswith("transformers.") or not name.endswith(("ForCausalLM", "LMHeadModel"))
            or not isinstance(getattr(model, "lm_head", None), torch.nn.Linear) or "forward" in vars(model)):
        return False
    model.forward = functools.partial(hf_causal_lm_forward, model, model.forward)
    return True


def _register_hf_attention() -> bool:
    """Register the engine's attention function, and sdpa's mask format for it, with transformers."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTENTION_NAME, hf_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, hf_attention_mask)  # "sdpa"'s, less sliding windows
    return True


@dataclasses.dataclass
class Replacement:
    name: str  # dotted path of the module in the model
    parent: torch.nn.Module
    attribute: str
    original: torch.nn.Module
    replacement: torch.nn.Module


@dataclasses.dataclass
class PatchReport:
    """What ``patch`` did: the modules replaced, the attention routing, what was left and why, and
    (with ``verify``) the largest difference per output and per gradient."""

    model: torch.nn.Module
    replaced: list[Replacement]
    attention: str | None  # the transformers attention implementation replaced by the engine's, if any
    left: dict[str, str]  # class name -> why it runs as it was
    differences: dict[str, float] | None = None
    rotary: list[tuple[object, Callable]] = dataclasses.field(default_factory=list)  # (modeling module, original)
    fused_loss: bool = False  # a transformers causal LM's loss by engine.ops.linear_cross_entropy

    def counts(self) -> Counter[str]:
        """Replaced modules per original class name."""
        return Counter(type(r.original).__name__ for r in self.replaced)

    def undo(self) -> None:
        """Put back every original module and attention implementation."""
        for r in reversed(self.replaced):
            setattr(r.parent, r.attribute, r.original)
        if self.attention is not None:
            self.model.set_attn_implementation(self.attention)
        for module, original in self.rotary:
            module.apply_rotary_pos_emb = original
        if self.fused_loss:
            del self.model.forward  # the instance's wrapper: the class's forward again
        self.replaced, self.attention, self.rotary, self.fused_loss = [], None, [], False

    def __str__(self) -> str:
        lines = [f"engine.patch: replaced {len(self.replaced)} module(s)"]
        lines += [f"  {name} x{count}" for name, count in sorted(self.counts().items())]
        if self.attention is not None:
            lines.append(f"  attention: transformers '{self.attention}' -> '{ATTENTION_NAME}' (engine SDPA)")
        for module, _ in self.rotary:
            lines.append(f"  rotary: {module.__name__}.apply_rotary_pos_emb -> engine.ops.apply_rotary")
        if self.fused_loss:
            lines.append("  loss: engine.ops.linear_cross_entropy from the final hidden states (training, with labels)")
        if self.left:
            lines.append("left as they were:")
            lines += [f"  {name}: {why}" for name, why in sorted(self.left.items())]
        if self.differences is not None:
            lines.append("verify (largest absolute difference, original vs patched):")
            ranked = sorted(self.differences.items(), key=lambda item: -item[1])
            outputs = [item for item in ranked if not item[0].startswith("grad ")]
            grads = [item for item in ranked if item[0].startswith("grad ")]
            lines += [f"  {name}: {value:.3g}" for name, value in outputs]
            if grads:
                lines.append(f"  gradients: {len(grads)} parameters, largest:")
                lines += [f"    {name.removeprefix('grad ')}: {value:.3g}" for name, value in grads[:5]]
        return "\n".join(lines)


def _replace(model: torch.nn.Module) -> tuple[list[Replacement], dict[str, str]]:
    replaced, left = [], {}

    def visit(parent: torch.nn.Module, prefix: str) -> None:
        for attribute, child in list(parent.named_children()):
            name = prefix + attribute
            convert = _converter(child)
            new = None if convert is None else convert(child)
            if new is not None:
                setattr(parent, attribute, new)
                replaced.append(Replacement(name, parent, attribute, child, new))
            elif isinstance(child, (engine_nn.LayerNorm, engine_nn.RMSNorm, engine_nn.MultiheadAttention,
                                    engine_nn.TransformerEncoderLayer, engine_nn.GatedMLP)):
                continue  # already the engine's
            else:
                if convert is not None:  # a converter that declined
                    left[type(child).__name__] = f"activation {type(child.act_fn).__name__} has no fused kernel"
                if not any(True for _ in child.children()) and any(True for _ in child.parameters(recurse=False)):
                    left[type(child).__name__] = "no engine replacement: runs PyTorch's own kernels"
                visit(child, name + ".")

    visit(model, "")
    return replaced, left


def _flat_outputs(out) -> list[tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [("output", out)]
    items = out.items() if isinstance(out, dict) else enumerate(out)
    return [(f"output {key}", value) for key, value in items
            if isinstance(value, torch.Tensor) and value.is_floating_point()]


def _outputs_and_grads(model: torch.nn.Module, sample) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``sample`` (a tensor, a tuple of args or a dict of kwargs); return its
    floating outputs and the gradients of a fixed random projection of them by parameter."""
    args, kwargs = ((), sample) if isinstance(sample, dict) else ((sample,), {}) if torch.is_tensor(sample) \
        else (tuple(sample), {})
    outputs = _flat_outputs(model(*args, **kwargs))
    generator = torch.Generator().manual_seed(0)
    loss = sum((value.float() * torch.randn(value.shape, generator=generator).to(value.device)).sum()
               for _, value in outputs)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    results = {name: value.detach() for name, value in outputs}
    results.update({f"grad {name}": g for (name, _), g in zip(params, grads) if g is not None})
    return results


def patch(model: torch.nn.Module, *, verify: bool = False, sample=None, attention: bool = True) -> PatchReport:
    """Swap the modules of ``model`` that the engine replaces (``REPLACEMENTS``) in place and, for
    transformers models, route attention through the engine (``attention=False`` skips that).

    ``verify=True`` runs ``model`` on ``sample`` (a tensor, tuple of args or dict of kwargs) in eval
    mode before and after, and records the largest difference of every output and parameter
    gradient in the report. Returns a ``PatchReport`` whose ``undo()`` restores the model.
    """
    if verify and sample is None:
        raise ValueError("patch: verify=True needs sample inputs (sample=...)")
    was_training = model.training
    before = None
    if verify:
        model.eval()
        before = _outputs_and_grads(model, sample)
    replaced, left = _replace(model)
    previous_attention = None
    config = getattr(model, "config", None)
    if attention and getattr(model, "_supports_attention_backend", False) and config is not None and \
            _register_hf_attention():
        previous_attention = config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)
    elif attention and config is not None and hasattr(model, "set_attn_implementation"):
        left["attention"] = "this transformers model does not use the attention-function registry"
    report = PatchReport(model, replaced, previous_attention, left, rotary=_patch_rotary(model),
                         fused_loss=_patch_causal_lm(model))
    if verify:
        after = _outputs_and_grads(model, sample)
        report.differences = {name: (after[name].double() - value.double()).abs().max().item()
                              for name, value in before.items()}
        model.train(was_training)
    return report
