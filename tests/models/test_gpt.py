"""The engine's GPT: configs, forward/loss, KV-cache generation, and the kernels against torch."""

import copy

import pytest
import torch

import engine
from engine.models import GPT, GPTConfig
from engine.testing import assert_close_to_exact, kernel_device, triton_launches

DEVICE = kernel_device()


def _model(name, **overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig.named(name, **overrides)).to(DEVICE)


def test_config_derives_fields_and_names_sizes():
    config = GPTConfig.named("llama-tiny")
    assert (config.num_kv_heads, config.head_dim, config.hidden_dim) == (2, 16, 160)
    assert GPTConfig.named("tiny").hidden_dim == 4 * 64 and GPTConfig.named("tiny").num_kv_heads == 4
    gpt2 = GPT(GPTConfig.named("gpt2"), device="meta")
    assert sum(p.numel() for p in gpt2.parameters()) == 124_439_808  # GPT-2 small, tied embeddings
    with pytest.raises(ValueError, match="unknown GPT size"):
        GPTConfig.named("huge")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(embed_dim=65, num_heads=4)
    with pytest.raises(ValueError, match="position"):
        GPTConfig(position="alibi")


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_forward_loss_and_tied_embeddings(name):
    model = _model(name)
    ids = torch.randint(0, 256, (2, 17), device=DEVICE)
    logits, loss = model(ids, labels=ids, return_logits=True)
    assert logits.shape == (2, 17, 256) and loss.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    no_logits, training_loss = model(ids, labels=ids)  # training: the loss never made the logits
    assert no_logits is None and torch.equal(training_loss, loss)
    assert model.eval()(ids, labels=ids)[0].shape == (2, 17, 256)
    assert model.lm_head.weight is model.tok_embed.weight
    assert not _model(name, tie_embeddings=False).lm_head.weight is _model(name).tok_embed.weight
    with pytest.raises(ValueError, match="max_positions"):
        model(torch.zeros(1, 129, dtype=torch.long, device=DEVICE))


def _greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_kv_cache_generation_equals_recomputing_every_step(name):
    model = _model(name).eval()
    ids = torch.randint(0, 256, (2, 9), device=DEVICE)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, 12), _greedy_without_cache(model, ids, 12))


def test_sampling_options():
    model = _model("llama-tiny").eval()
    ids = torch.randint(0, 256, (3, 5), device=DEVICE)
    greedy = model.generate(ids, 6)
    assert torch.equal(model.generate(ids, 6, do_sample=True, top_k=1), greedy)
    assert torch.equal(model.generate(ids, 6, do_sample=True, top_p=1e-6), greedy)
    draw = lambda seed, **kw: model.generate(ids, 6, do_sample=True, generator=torch.Generator(DEVICE).manual_seed(seed), **kw)  # noqa: E731
    assert torch.equal(draw(1, temperature=2.0), draw(1, temperature=2.0))
    assert not torch.equal(draw(1, temperature=5.0), draw(2, temperature=5.0))
    top3 = draw(3, top_k=3, temperature=3.0)
    with torch.no_grad():
        for step in range(6):  # every sampled token is among the 3 most likely at its step
            logits = model(top3[:, :5 + step])[:, -1]
            assert (logits.topk(3).indices == top3[:, 5 + step, None]).any(-1).all()
    eos = int(greedy[0, 6])  # the first generated token of row 0
    stopped = model.generate(ids, 6, eos_token_id=eos)
    assert (stopped[0, 6:] == eos).all()


def _compare_backends(model, ids, labels):
    """Logits and every parameter gradient: the Triton kernels (forced) against torch's ops, both
    measured against a float64 copy of the model."""
    exact = copy.deepcopy(model).double()

    def run(m, backend):
        m.zero_grad()
        with engine.use_backend(backend):
            logits, loss = m(ids, labels=labels, return_logits=True)
            loss.backward()
        return logits.detach(), {n: p.grad for n, p in m.named_parameters()}

    with triton_launches() as launches:
        fused_logits, fused_grads = run(model, "triton")
    torch_logits, torch_grads = run(model, "torch")
    exact_logits, exact_grads = run(exact, "torch")
    assert_close_to_exact(fused_logits, torch_logits, exact_logits, what="logits")
    for name in fused_grads:
        assert_close_to_exact(fused_grads[name], torch_grads[name], exact_grads[name], what=f"{name}.grad")
    return launches


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_kernels_match_torch_through_the_whole_model(name):
    model = _model(name)
    ids = torch.randint(0, 256, (2, 37), device=DEVICE)
    launches = _compare_backends(model, ids, ids)
    layers = model.config.num_layers
    norm = "rms_norm" if name == "llama-tiny" else "layer_norm"
    assert launches["attention_fwd"] == layers and launches["attention_bwd_dkdv"] == layers
    assert launches[f"{norm}_fwd"] == 2 * layers + 1
    assert launches["cross_entropy"] == 1  # the loss: one chunk of 2 x 36 rows, gradients included


def test_torch_compile_of_an_engine_model():
    """torch.compile traces the engine's modules (here on PyTorch's path: CPU under "auto")."""
    model = GPT(GPTConfig.named("tiny")).eval()
    compiled = torch.compile(model)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-4, atol=1e-4)
