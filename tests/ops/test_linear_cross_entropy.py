"""engine.ops.linear_cross_entropy against F.cross_entropy(F.linear(...)) under the 2x-float64
rule (loss, dhidden, dweight, dbias), with the Triton row kernel forced (the interpreter on CPU):
dtypes, vocabularies that are multiples of nothing, every reduction, ignore_index patterns
(none, some, a whole chunk, all), label smoothing, z-loss, softcapping, chunk sizes down to one
row, leading dimensions, empty inputs and torch's exception types for bad input."""

import pytest
import torch
import torch.nn.functional as F

from engine import backend
from engine.ops import linear_cross_entropy
from engine.testing import check_against_torch, kernel_device, triton_launches

DEVICE = kernel_device()


def _reference(hidden, weight, bias, target, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
               z_loss=0.0, softcap=None):
    """The eager definition, in the inputs' dtype: F.linear, the cap, F.cross_entropy, z_loss * lse^2."""
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none",
                           ignore_index=ignore_index, label_smoothing=label_smoothing)
    if z_loss:
        counted = target.reshape(-1) != ignore_index
        loss = loss + torch.where(counted, z_loss * torch.logsumexp(logits.float(), -1).reshape(-1) ** 2, 0.0).to(loss.dtype)
    if reduction == "none":
        return loss.reshape(target.shape)
    total = loss.sum()
    return total / (target != ignore_index).sum() if reduction == "mean" else total


def _inputs(rows, hidden_size, vocab, dtype, *, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) / hidden_size ** 0.5
    b = torch.randn(vocab, generator=generator) if bias else None
    target = torch.randint(0, vocab, (rows,), generator=generator)
    to = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return to(hidden), to(weight), to(b), target.to(DEVICE)


def _check(hidden, weight, bias, target, *, chunk_rows=4, **options):
    """Hold the fused op to the rule; return its kernel launches."""
    chunk_memory = chunk_rows * weight.shape[0] * hidden.element_size()
    names = ["loss", "hidden.grad", "weight.grad"] + (["bias.grad"] if bias is not None else [])
    return check_against_torch(
        lambda h, w, b: linear_cross_entropy(h, w, target, b, chunk_memory=chunk_memory, **options),
        lambda h, w, b: _reference(h, w, b, target, **options), hidden, weight, bias, names=names)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_torch(dtype, reduction):
    hidden, weight, bias, target = _inputs(13, 32, 50257, dtype)
    target[3] = -100
    launches = _check(hidden, weight, bias, target, reduction=reduction)
    chunks = 4  # 13 rows in chunks of 4
    assert launches["cross_entropy"] == (2 * chunks if reduction == "none" else chunks)  # none: again in backward


@pytest.mark.parametrize("vocab", [32000, 151936, 1, 3])
def test_vocabularies_of_any_size(vocab):
    hidden, weight, bias, target = _inputs(6, 16, vocab, torch.bfloat16)
    assert _check(hidden, weight, bias, target)["cross_entropy"] == 2


@pytest.mark.parametrize("pattern", ["none", "some", "a whole chunk", "all"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ignore_index_patterns(pattern, reduction):
    hidden, weight, bias, target = _inputs(12, 16, 777, torch.float32)
    ignored = {"none": [], "some": [0, 5, 11], "a whole chunk": [4, 5, 6, 7], "all": list(range(12))}[pattern]
    target[ignored] = -100
    if pattern == "all" and reduction == "mean":  # 0 / 0: NaN, as torch's; the gradients are zeros
        h, w = (t.clone().requires_grad_() for t in (hidden, weight))
        with triton_launches():
            loss = linear_cross_entropy(h, w, target, bias)
        loss.backward()
        assert loss.isnan() and torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
        assert _reference(hidden, weight, bias, target).isnan()
        return
    _check(hidden, weight, bias, target, reduction=reduction)


def test_a_custom_ignore_index_inside_the_vocabulary():
    hidden, weight, bias, target = _inputs(10, 16, 300, torch.float32)
    target[::3] = 7
    _check(hidden, weight, bias, target, ignore_index=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(label_smoothing=0.1), dict(label_smoothing=1.0), dict(z_loss=1e-3),
                                     dict(softcap=30.0), dict(softcap=2.0, label_smoothing=0.2, z_loss=1e-2)], ids=str)
def test_smoothing_z_loss_and_softcap(options, dtype):
    hidden, weight, bias, target = _inputs(9, 32, 1000, dtype)
    hidden = hidden * 4  # logits large enough for the cap to matter
    target[2] = -100
    _check(hidden, weight, bias, target, **options)


@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
def test_any_chunk_size_gives_the_same_answer(chunk_rows):
    hidden, weight, _, target = _inputs(11, 16, 500, torch.float32, bias=False)
    launches = _check(hidden, weight, None, target, chunk_rows=chunk_rows)
    assert launches["cross_entropy"] == -(-11 // min(chunk_rows, 11))


def test_leading_dimensions_and_no_grad():
    hidden, weight, bias, target = _inputs(12, 16, 400, torch.float32)
    hidden, target = hidden.reshape(3, 4, 16), target.reshape(3, 4)
    _check(hidden, weight, bias, target, reduction="none")
    with torch.no_grad(), triton_launches() as launches:
        loss = linear_cross_entropy(hidden, weight, target, bias)
    torch.testing.assert_close(loss, _reference(hidden, weight, bias, target))
    assert launches["cross_entropy"] == 1


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_input_gives_torchs_answer(reduction):
    hidden, weight, bias, _ = _inputs(0, 16, 50, torch.float32)
    target = torch.zeros(0, dtype=torch.long, device=DEVICE)
    h = hidden.clone().requires_grad_()
    with triton_launches():
        got = linear_cross_entropy(h, weight, target, bias, reduction=reduction)
    expected = _reference(hidden, weight, bias, target, reduction=reduction)
    torch.testing.assert_close(got, expected, equal_nan=True)
    got.sum().backward()
    assert h.grad.shape == (0, 16)


def test_the_torch_path_matches_too():
    hidden, weight, bias, target = _inputs(10, 16, 321, torch.float64)
    target[1] = -100
    for reduction in ("mean", "none"):
        for options in (dict(), dict(label_smoothing=0.3, z_loss=1e-3, softcap=5.0)):
            h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
            with backend.use_backend("torch"):
                got = linear_cross_entropy(h, w, target, b, reduction=reduction, chunk_memory=3 * 321 * 8, **options)
            expected = _reference(*(t.clone().requires_grad_() for t in (hidden, weight, bias)), target,
                                  reduction=reduction, **options)
            torch.testing.assert_close(got, expected)
            got.sum().backward()
            assert h.grad is not None and w.grad is not None and b.grad is not None


def test_gradient_scaling_reaches_every_gradient():
    """A GradScaler-style scaled loss: the stored gradients are scaled by the incoming one."""
    hidden, weight, _, target = _inputs(8, 16, 200, torch.float32, bias=False)
    h, w = (t.clone().requires_grad_() for t in (hidden, weight))
    with triton_launches():
        (linear_cross_entropy(h, w, target) * 1024.0).backward()
    h0, w0 = (t.clone().requires_grad_() for t in (hidden, weight))
    (_reference(h0, w0, None, target) * 1024.0).backward()
    torch.testing.assert_close(h.grad, h0.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, w0.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad, error, match", [
    (dict(target=torch.tensor([0, 1, 9])), IndexError, r"Target out of bounds: a target is outside \[0, 5\)"),
    (dict(target=torch.tensor([0, 1, -5])), IndexError, "Target out of bounds"),
    (dict(target=torch.tensor([0, 1, 2], dtype=torch.int32)), RuntimeError, "Long or Byte"),
    (dict(target=torch.tensor([0, 1])), ValueError, "target must have shape"),
    (dict(reduction="avg"), ValueError, "avg is not a valid value for reduction"),
    (dict(label_smoothing=1.5), RuntimeError, "label_smoothing must be between 0.0 and 1.0"),
    (dict(weight=torch.randn(5, 3)), ValueError, "weight must be"),
    (dict(weight=torch.randn(5, 4, dtype=torch.float64)), TypeError, "share one floating-point dtype"),
    (dict(bias=torch.randn(4)), ValueError, "bias must have shape"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(chunk_memory=0), ValueError, "chunk_memory"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_raises_what_torch_raises(bad, error, match):
    arguments = dict(hidden=torch.randn(3, 4), weight=torch.randn(5, 4), target=torch.tensor([0, 1, 2])) | bad
    with pytest.raises(error, match=match):
        linear_cross_entropy(**arguments)
    if set(bad) <= {"target", "reduction", "label_smoothing"}:  # torch's own call raises the same type
        with pytest.raises(error):
            F.cross_entropy(F.linear(arguments["hidden"], arguments["weight"]), arguments["target"],
                            reduction=arguments.get("reduction", "mean"),
                            label_smoothing=arguments.get("label_smoothing", 0.0))


def test_reads_nothing_back_from_the_device():
    """No .item(), bool() or the like (each a synchronisation on a GPU), forward or backward."""
    from engine.testing import count_host_reads

    hidden, weight, bias, target = _inputs(10, 16, 300, torch.float32)
    h = hidden.clone().requires_grad_()
    with triton_launches(), count_host_reads() as reads:
        linear_cross_entropy(h, weight, target, bias, chunk_memory=4 * 300 * 4).backward()
    assert not reads


def test_only_the_gradients_asked_for_are_made():
    """A frozen input (here the hidden states) costs neither its matmul nor its memory."""
    from engine.testing import track_memory

    hidden, weight, _, target = _inputs(12, 16, 300, torch.float32, bias=False)
    w = weight.clone().requires_grad_()
    with triton_launches(), track_memory() as trace:
        linear_cross_entropy(hidden, w, target).backward()
    assert trace.saved == 300 * 16 * 4  # dweight alone, no dhidden
    w0 = weight.clone().requires_grad_()
    _reference(hidden, w0, None, target).backward()
    torch.testing.assert_close(w.grad, w0.grad)
