"""engine.nn.LayerNorm / RMSNorm as drop-ins for torch.nn's."""

import pytest
import torch

import engine
from engine.testing import assert_close, forward_backward, triton_launches

LAYER_NORM_ARGS = [
    dict(normalized_shape=97),
    dict(normalized_shape=(6, 5), eps=1e-3),
    dict(normalized_shape=64, elementwise_affine=False),
    dict(normalized_shape=64, bias=False),
]
RMS_NORM_ARGS = [
    dict(normalized_shape=97),
    dict(normalized_shape=(6, 5), eps=1e-3),
    dict(normalized_shape=64, elementwise_affine=False),
]
PAIRS = [(engine.nn.LayerNorm, torch.nn.LayerNorm, a) for a in LAYER_NORM_ARGS] + [
    (engine.nn.RMSNorm, torch.nn.RMSNorm, a) for a in RMS_NORM_ARGS
]


def _ids(pair):
    ours, _, args = pair
    return f"{ours.__name__}-" + "-".join(f"{k}={v}" for k, v in args.items())


def _input(args, device, dtype=torch.float32):
    shape = args["normalized_shape"]
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.randn(3, 7, *shape, device=device, dtype=dtype)


@pytest.mark.parametrize("pair", PAIRS, ids=_ids)
def test_same_parameters_and_state_dict(pair, device):
    ours, theirs, args = pair
    torch.manual_seed(0)
    reference = theirs(**args, device=device)
    module = ours(**args, device=device)
    assert isinstance(module, theirs)
    assert list(module.state_dict()) == list(reference.state_dict())
    assert repr(module).split("(", 1)[1] == repr(reference).split("(", 1)[1]
    for (name, p), (_, q) in zip(module.named_parameters(), reference.named_parameters()):
        assert p.shape == q.shape and p.dtype == q.dtype and p.device == q.device, name


@pytest.mark.parametrize("pair", PAIRS, ids=_ids)
def test_loads_torch_state_dict_and_matches(pair, kernel_device):
    """A torch module's (randomised) state_dict loads, and forward and backward agree."""
    ours, theirs, args = pair
    torch.manual_seed(0)
    reference = theirs(**args, device=kernel_device)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_()
    module = ours(**args, device=kernel_device)
    module.load_state_dict(reference.state_dict())
    x = _input(args, kernel_device)

    with triton_launches() as launches:
        outs, grads, used = forward_backward(module, x)
    expected_outs, expected_grads, _ = forward_backward(reference, x, grads=used)
    assert launches.total() >= 2
    assert_close(outs[0], expected_outs[0], what="output")
    assert_close(grads[0], expected_grads[0], what="input.grad")
    for (name, p), (_, q) in zip(module.named_parameters(), reference.named_parameters()):
        assert_close(p.grad, q.grad, what=f"{name}.grad")


@pytest.mark.parametrize("pair", PAIRS, ids=_ids)
def test_auto_backend_on_cpu_is_torch_exactly(pair):
    """Under "auto", CPU tensors take PyTorch's own path: bit-identical, no kernel launched."""
    ours, theirs, args = pair
    torch.manual_seed(0)
    reference = theirs(**args)
    module = ours.from_torch(reference)
    x = _input(args, "cpu")
    with engine.kernels.count_launches() as launches:
        out = module(x)
    assert launches.total() == 0
    assert torch.equal(out, reference(x))


@pytest.mark.parametrize("pair", PAIRS, ids=_ids)
def test_from_torch_shares_parameters(pair, device):
    ours, theirs, args = pair
    reference = theirs(**args, device=device)
    module = ours.from_torch(reference)
    assert type(module) is ours
    assert module.eps == reference.eps and module.normalized_shape == reference.normalized_shape
    for p, q in zip(module.parameters(), reference.parameters()):
        assert p is q  # the same Parameter: no copy
    assert list(module.state_dict()) == list(reference.state_dict())


def test_from_torch_rejects_other_modules():
    with pytest.raises(TypeError, match="LayerNorm"):
        engine.nn.LayerNorm.from_torch(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="RMSNorm"):
        engine.nn.RMSNorm.from_torch(torch.nn.LayerNorm(3))


def test_module_in_half_precision(kernel_device):
    torch.manual_seed(0)
    reference = torch.nn.LayerNorm(40, device=kernel_device, dtype=torch.float16)
    module = engine.nn.LayerNorm.from_torch(reference)
    x = torch.randn(5, 40, device=kernel_device, dtype=torch.float16)
    with triton_launches() as launches:
        out = module(x)
    assert launches["layer_norm_fwd"] == 1 and out.dtype == torch.float16
    assert_close(out, reference(x))
