"""torch.compile over the engine: its torch.library ops pass opcheck, and the engine's models and
patched Hugging Face models compile with fullgraph=True (no graph break), give the eager engine's
results and run the kernels, forward and backward. Under the interpreter the ops are opaque
custom ops, so the "aot_eager" backend runs them (Inductor would compile the surrounding CPU code
only); on a GPU the same tests use Inductor."""

import pytest
import torch
from torch._dynamo.utils import counters

import engine
from engine.models import GPT, BertConfig, BertModel, GPTConfig
from engine.ops import library
from engine.testing import attention_inputs, kernel_device, triton_launches

DEVICE = kernel_device()
COMPILER = "inductor" if DEVICE == "cuda" else "aot_eager"
# Launches inside a compiled run are counted under the interpreter, where the ops run their
# launchers; under Inductor the compiled graph launches the kernels itself, which no counter sees.
COUNTED = COMPILER == "aot_eager"


def _grad(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=True)


def _norm_cases():
    x, w, b = _grad(6, 48), _grad(48), _grad(48)
    half = _grad(6, 40, dtype=torch.float16)
    return {
        "layer_norm": (x, None, w, b, 1e-5, False, 0.0, "gemma", None, None, None),
        "rms_norm without weight": (x, None, None, None, 1e-6, True, 0.0, "gemma", None, None, None),
        "add_norm fp16, residual in fp32": (half, _grad(6, 40, dtype=torch.float16), _grad(40), None, 1e-6, True,
                                            1.0, "llama", torch.float32, torch.float16, torch.float32),
    }


def _attention_cases():
    q, k, v = (t.detach().requires_grad_() for t in attention_inputs((2, 4, 2, 19, 23, 32), torch.float32))
    additive = torch.randn(2, 1, 19, 23, device=DEVICE)
    keys = torch.ones(2, 1, 1, 23, dtype=torch.bool, device=DEVICE)
    keys[1, ..., 15:] = False
    seed = torch.tensor([7], device=DEVICE)
    packed = [t.detach().transpose(1, 2).reshape(-1, t.shape[1], 32).requires_grad_() for t in (q, k, v)]
    cu = torch.tensor([0, 11, 19], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 9, 23], dtype=torch.int32, device=DEVICE)
    plain = (q, k, v)
    none = (-2, -2, 0.0, None, None)  # no sliding window, softcap, ALiBi or sinks
    slopes = torch.rand(2, 4, device=DEVICE)
    sinks = torch.randn(4, device=DEVICE, requires_grad=True)
    return {
        "causal, GQA": (*plain, None, 0.2, "top_left", 0.0, None, None, None, None, None, False, *none),
        "causal, GQA, deterministic": (*plain, None, 0.2, "top_left", 0.0, None, None, None, None, None, True, *none),
        "key padding, bottom-right": (*plain, keys, 0.2, "bottom_right", 0.0, None, None, None, None, None, False,
                                      *none),
        "additive mask": (*plain, additive, 0.2, None, 0.0, None, None, None, None, None, False, *none),
        "dropout": (*plain, None, 0.2, None, 0.3, seed, None, None, None, None, False, *none),
        "sliding window": (*plain, None, 0.2, None, 0.0, None, None, None, None, None, False, 6, 2, 0.0, None, None),
        "softcap, causal": (*plain, None, 0.2, "top_left", 0.0, None, None, None, None, None, False, -2, -2, 5.0, None, None),
        "ALiBi per batch and head, sinks, additive mask": (*plain, additive, 0.2, None, 0.0, None, None, None, None,
                                                           None, False, -2, -2, 0.0, slopes, sinks),
        "packed": (packed[0][:19], packed[1][:23], packed[2][:23], None, 0.2, "top_left", 0.0, None, cu, cu_k, 11, 14,
                   False, 4, 0, 0.0, slopes[0], sinks),
    }


@pytest.mark.parametrize("case", list(_norm_cases()))
def test_norm_ops_pass_opcheck(case):
    args = _norm_cases()[case]
    torch.library.opcheck(library.norm_fwd.op, args)
    x, residual, weight, bias, eps, rms, offset, _, _, _, _ = args
    y, h, mean, rstd = library.norm_fwd(*args)
    normed = x if residual is None else h
    weight = None if weight is None else weight.detach()  # the backward op itself is not differentiated
    torch.library.opcheck(library.norm_bwd.op, (torch.randn_like(y), normed.detach(), weight, mean, rstd,
                                             None if residual is None else torch.randn_like(h), None if bias is None
                                             else bias.dtype, rms, offset))


@pytest.mark.parametrize("case", list(_attention_cases()))
def test_attention_ops_pass_opcheck(case):
    args = _attention_cases()[case]
    torch.library.opcheck(library.attention_fwd.op, args)
    out, lse, lse_lo = library.attention_fwd(*args)
    q, k, v = (t.detach() for t in args[:3])
    sinks = None if args[-1] is None else args[-1].detach()
    torch.library.opcheck(library.attention_bwd.op, (torch.randn_like(out), q, k, v, out.detach(), lse, lse_lo,
                                                  *args[3:-1], sinks))


def test_flex_attention_ops_pass_opcheck():
    """User mods travel through the op as a registry key; the block lists and mod tensors as lists."""
    from engine.kernels.attention import mods
    from engine.ops import create_block_mask, flex

    q, k, v = (t.requires_grad_() for t in attention_inputs((1, 2, 1, 150, 150, 16), torch.float32))
    docs = torch.repeat_interleave(torch.arange(2), torch.tensor([40, 110])).to(torch.int32).to(DEVICE)
    table = torch.randn(2, 257, device=DEVICE)
    with triton_launches():
        block_mask = create_block_mask(mods.document, None, None, 150, 150, device=DEVICE, mask_mod_args=(docs,))
    key = flex._mods_key(mods.relative_bias, None, mods.document)
    lists = [*block_mask.rows, *block_mask.cols]
    args = (q, k, v, 0.25, key, lists, 128, [table], [docs], False)
    torch.library.opcheck(library.flex_attention_fwd.op, args)
    out, lse = library.flex_attention_fwd(*args)
    torch.library.opcheck(library.flex_attention_bwd.op, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                                       out.detach(), lse, *args[3:]))


def test_flex_attention_compiles_without_a_graph_break():
    from engine.kernels.attention import mods
    from engine.ops import create_block_mask, flex_attention

    q, k, v = (t.requires_grad_() for t in attention_inputs((1, 2, 2, 140, 140, 16), torch.float32))
    cap = torch.tensor([4.0], device=DEVICE)
    with triton_launches():
        block_mask = create_block_mask(mods.causal, None, None, 140, 140, device=DEVICE)
        eager = flex_attention(q, k, v, mods.softcap, block_mask, score_mod_grad=mods.softcap_grad,
                               score_mod_args=(cap,))
        (eager_grad,) = torch.autograd.grad(eager.sum(), q)
        counters.clear()
        compiled = torch.compile(lambda q, k, v: flex_attention(q, k, v, mods.softcap, block_mask,
                                                                score_mod_grad=mods.softcap_grad,
                                                                score_mod_args=(cap,)),
                                 backend=COMPILER, fullgraph=True)
        out = compiled(q, k, v)
        (grad,) = torch.autograd.grad(out.sum(), q)
    assert not counters["graph_break"]
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, eager_grad)


def test_paged_attention_op_passes_opcheck():
    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(9, 16, 2, 32, generator=generator).to(DEVICE) for _ in range(2))
    table = torch.tensor([[3, 0, 7], [8, 1, 2]], dtype=torch.int32, device=DEVICE)
    lengths = torch.tensor([40, 5], dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 4, 1, 32, generator=generator).to(DEVICE)
    for window, sinks in (((-2, -2), None), ((8, 0), torch.zeros(4, device=DEVICE))):
        torch.library.opcheck(library.paged_attention.op, (q, k_cache, v_cache, table, lengths, 0.2, True, *window, 0.0,
                                                           None, sinks))


def _optimizer_parameters():
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(*shape, generator=generator).to(DEVICE).requires_grad_() for shape in ((8, 12), (12,))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(DEVICE) * 3
    return params


def test_multi_tensor_ops_pass_opcheck():
    params = [p.detach() for p in _optimizer_parameters()]
    grads = [p.grad for p in _optimizer_parameters()]
    moments = [[torch.rand_like(p) for p in params] for _ in range(3)]
    steps = [torch.ones((), device=DEVICE) for _ in params]
    scale = torch.full((), 4.0, device=DEVICE)
    for amsgrad, grad_scale in ((False, None), (True, scale)):
        torch.library.opcheck(torch.ops.engine.adamw_step.default, (
            params, grads, moments[0], moments[1], moments[2] if amsgrad else [], steps, 1e-3, 0.9, 0.999, 1e-8,
            0.99, False, amsgrad, grad_scale, None))
    for inf_norm in (False, True):
        torch.library.opcheck(torch.ops.engine.multi_tensor_norm.default, (grads, inf_norm))
    torch.library.opcheck(torch.ops.engine.multi_tensor_scale_.default, (grads, torch.full((), 0.5, device=DEVICE)))


def test_cross_entropy_rows_passes_opcheck():
    logits = torch.randn(6, 301, device=DEVICE)
    target = torch.tensor([0, 5, -100, 300, 7, 7], device=DEVICE)
    for scale, softcap in ((None, None), (torch.full((1,), 0.25, device=DEVICE), 20.0),
                           (torch.rand(6, device=DEVICE), None)):
        torch.library.opcheck(library.cross_entropy_rows.op, (logits.clone(), target, scale, -100, 0.1, 1e-3, softcap))


def test_glu_and_rotary_ops_pass_opcheck():
    fused = _grad(5, 2 * 48)
    gate, up = fused.chunk(2, dim=-1)  # strided halves, as the MLP passes them
    for activation in ("silu", "gelu", "gelu_tanh"):
        torch.library.opcheck(library.glu_fwd.op, (gate, up, activation))
        torch.library.opcheck(library.glu_bwd.op, (torch.randn(5, 48, device=DEVICE), gate.detach(), up.detach(),
                                                   activation))
    x = _grad(2, 3, 7, 40)
    cos, sin = torch.rand(2, 7, 32, device=DEVICE), torch.rand(2, 7, 32, device=DEVICE)
    for interleaved in (False, True):
        torch.library.opcheck(library.rotary.op, (x, cos, sin, interleaved, False))
        torch.library.opcheck(library.rotary_.op, (x.detach().clone(), cos, sin, interleaved))


def test_linear_cross_entropy_compiles_whole():
    hidden, weight = _grad(2, 9, 32), _grad(301, 32)
    target = torch.randint(0, 301, (2, 9), device=DEVICE)
    loss_of = lambda hidden, weight: engine.ops.linear_cross_entropy(hidden, weight, target,  # noqa: E731
                                                                     chunk_memory=4 * 301 * 4)

    def step(fn):
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight)
        loss.backward()
        return [loss.detach(), hidden.grad, weight.grad]

    counters.clear()
    torch._dynamo.reset()
    with engine.use_backend("triton"), triton_launches() as launches:
        expected = step(loss_of)
        got = step(torch.compile(loss_of, backend=COMPILER, fullgraph=True))
    assert not counters["graph_break"]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    assert launches["cross_entropy"] == 5 + (5 if COUNTED else 0)  # 18 rows in chunks of 4, eager then compiled


def test_an_optimizer_step_with_clipping_compiles_whole():
    """FusedAdamW.step and clip_grad_norm_ reach the extension through torch.ops.engine.*, so they
    compile with fullgraph=True and give the eager results (two steps, amsgrad, weight decay)."""
    from engine.optim import FusedAdamW, clip_grad_norm_

    def run(step, clip, params, optimizer):
        norms = []
        for _ in range(2):
            norms.append(clip(params))
            step(optimizer)
        return norms + [p.detach().clone() for p in params] + [optimizer.state[p]["exp_avg"] for p in params]

    counters.clear()
    torch._dynamo.reset()
    expected_params, got_params = _optimizer_parameters(), _optimizer_parameters()
    options = dict(lr=0.1, weight_decay=0.1, amsgrad=True)
    expected = run(lambda opt: opt.step(), lambda ps: clip_grad_norm_(ps, 1.0), expected_params,
                   FusedAdamW(expected_params, **options))
    optimizer = FusedAdamW(got_params, **options)
    step = torch.compile(optimizer.step, backend=COMPILER, fullgraph=True)
    clip = torch.compile(lambda ps: clip_grad_norm_(ps, 1.0), backend=COMPILER, fullgraph=True)
    got = run(lambda opt: step(), clip, got_params, optimizer)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def _compiled_matches_eager(model, run, *, dynamic=None):
    """run(model) under the kernels, eager then compiled: (eager result, compiled result, launches)."""
    counters.clear()
    torch._dynamo.reset()
    with engine.use_backend("triton"):
        expected = run(model)
        compiled = torch.compile(model, backend=COMPILER, fullgraph=True, dynamic=dynamic)
        with triton_launches() as launches:
            got = run(compiled)
    assert not counters["graph_break"], dict(counters["graph_break"])
    return expected, got, launches


def _train_step(batch, **labels):
    def run(model):
        model.zero_grad(set_to_none=True)
        out = model(*batch, **labels)
        loss = out[1] if isinstance(out, tuple) else out.float().square().mean()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return run


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_gpt_training_step_compiles_whole(name):
    torch.manual_seed(0)
    model = GPT(GPTConfig.named(name)).to(DEVICE)
    ids = torch.randint(0, 256, (2, 24), device=DEVICE)
    expected, got, launches = _compiled_matches_eager(model, _train_step((ids,), labels=ids))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    layers = model.config.num_layers
    assert not COUNTED or launches["attention_fwd"] == layers and launches["attention_bwd_dkdv"] == layers
    assert not COUNTED or launches["rms_norm_bwd" if name == "llama-tiny" else "layer_norm_bwd"] >= 2 * layers


def test_gpt_with_dropout_compiles_whole_and_draws_a_fresh_mask_each_step():
    torch.manual_seed(0)
    model = GPT(GPTConfig.named("tiny", dropout=0.2)).to(DEVICE)
    ids = torch.randint(0, 256, (2, 24), device=DEVICE)
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=COMPILER, fullgraph=True)
    with engine.use_backend("triton"), triton_launches() as launches:
        losses = [compiled(ids, labels=ids)[1] for _ in range(2)]
    assert not counters["graph_break"]
    assert not COUNTED or launches["attention_fwd"] == 2 * model.config.num_layers
    assert losses[0].isfinite() and losses[0] != losses[1]  # the seed is drawn inside the graph


def test_a_kv_cache_decode_step_compiles_whole():
    torch.manual_seed(0)
    model = GPT(GPTConfig.named("llama-tiny")).to(DEVICE).eval()
    prompt = torch.randint(0, 256, (2, 9), device=DEVICE)

    def decode(m):
        cache = model.new_cache(2, 16)
        with torch.no_grad():
            m(prompt, cache=cache)
            return m(prompt[:, -1:], cache=cache)
    expected, got, launches = _compiled_matches_eager(model, decode)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not COUNTED or launches["attention_fwd"] == 2 * model.config.num_layers


def test_packed_variable_length_attention_compiles_whole():
    from engine.ops import flash_attn_varlen

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, 4, 32, generator=generator).to(DEVICE).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, 7, 40], dtype=torch.int32, device=DEVICE)

    def run(attention):
        q.grad = k.grad = v.grad = None
        out = attention(q, k, v, cu, cu, 33, 33, causal=True)
        out.square().sum().backward()
        return [out.detach(), q.grad, k.grad, v.grad]
    expected, got, launches = _compiled_matches_eager(flash_attn_varlen, run)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not COUNTED or launches["attention_fwd"] == 1 and launches["attention_bwd_dkdv"] == 1
    bad = torch.tensor([0, 7, 41], dtype=torch.int32, device=DEVICE)  # past the 40 packed tokens
    with engine.use_backend("triton"), pytest.raises(RuntimeError, match="must rise from 0 to the 40"):
        torch.compile(flash_attn_varlen, backend=COMPILER, fullgraph=True)(q, k, v, bad, bad, 34, 34)


def test_bert_with_a_padding_mask_compiles_whole():
    torch.manual_seed(0)
    model = BertModel(BertConfig.named("tiny", dropout=0.0)).to(DEVICE)  # eager and compiled dropout draws differ
    ids = torch.randint(0, 128, (2, 21), device=DEVICE)
    mask = torch.ones(2, 21, dtype=torch.long, device=DEVICE)
    mask[1, 13:] = 0
    expected, got, launches = _compiled_matches_eager(model, _train_step((ids, mask)))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not COUNTED or launches["attention_fwd"] == model.config.num_layers and launches["attention_bwd_dkdv"] == 2


def _hugging_face(family):
    transformers = pytest.importorskip("transformers")  # not on the lent GPU image
    torch.manual_seed(0)
    if family == "bert":
        model = transformers.BertModel(add_pooling_layer=False, config=transformers.BertConfig(
            vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2))
    return model.to(DEVICE)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_patched_hugging_face_models_compile_whole(family):
    model = _hugging_face(family)
    report = engine.patch(model)
    ids = torch.randint(0, 100, (2, 17), device=DEVICE)
    mask = torch.ones(2, 17, dtype=torch.long, device=DEVICE)
    mask[1, 12:] = 0

    def run(m):
        model.zero_grad(set_to_none=True)
        out = m(input_ids=ids, attention_mask=mask if family == "bert" else None)
        first = out.last_hidden_state if family == "bert" else out.logits
        first.float().square().mean().backward()
        return [first.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    try:
        expected, got, launches = _compiled_matches_eager(model, run)
    finally:
        report.undo()  # the rotary function is the modeling module's: leave it as it was
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not COUNTED or launches["attention_fwd"] == 2 and launches["attention_bwd_dkdv"] == 2


def test_a_patched_causal_lms_fused_loss_compiles_whole():
    """Training with labels: lm_head stands aside for the call and the loss is the fused one."""
    model = _hugging_face("llama")
    report = engine.patch(model)
    ids = torch.randint(0, 100, (2, 17), device=DEVICE)

    def run(m):
        model.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    try:
        expected, got, launches = _compiled_matches_eager(model, run)
    finally:
        report.undo()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not COUNTED or launches["cross_entropy"] == 1  # in the compiled run


def test_changing_sequence_lengths_compile_at_most_twice():
    """The first length compiles static; the second marks the length dynamic; later ones reuse it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.named("tiny")).to(DEVICE).eval()
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=COMPILER, fullgraph=True)
    with engine.use_backend("triton"), torch.no_grad():
        for length in (16, 24, 33, 47):
            ids = torch.randint(0, 256, (2, length), device=DEVICE)
            torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert not counters["graph_break"]
