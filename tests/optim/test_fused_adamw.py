"""FusedAdamW against torch.optim.AdamW: 100 steps within 1e-6 relative, state_dict both ways,
schedulers, the extension really in use."""

import copy
import math
import os
from collections import Counter

import pytest
import torch

from engine import backend, extension
from engine.launches import count_launches
from engine.optim import FusedAdamW, _Lane, clip_grad_norm_
from engine.testing import assert_close_to_exact, count_host_reads

# Odd sizes, 0- and 1-element tensors, and one larger than a CUDA chunk (65536).
SHAPES = [(0,), (1,), (7,), (33, 5), (1000,), (65537,)]
OPTIONS = [
    dict(),
    dict(amsgrad=True),
    dict(maximize=True),
    dict(weight_decay=0.0, betas=(0.8, 0.95), eps=1e-6),
    dict(lr=torch.tensor(3e-3)),
    dict(amsgrad=True, maximize=True, weight_decay=0.1),
]


def _params(device="cpu", dtype=torch.float32, shapes=SHAPES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator).to(device, dtype).requires_grad_() for s in shapes]


def _clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def _set_grads(params, step, skip=()):
    generator = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
        p.grad = None if i in skip else grad


def _run(optimizer, params, steps, start=0, skip=(), scheduler=None):
    for step in range(start, start + steps):
        _set_grads(params, step, skip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def assert_params_close(ours, theirs):
    for i, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m: f"parameter {i}: {m}")


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_100_steps_match_torch(options):
    params = _params()
    reference = _clone(params)
    ours = FusedAdamW(params, **options)
    theirs = torch.optim.AdamW(reference, **options)
    with count_launches() as launches:
        _run(ours, params, 100)
    _run(theirs, reference, 100)
    assert launches["adamw_step_cpu"] == 100  # one extension call per step for all tensors
    assert_params_close(params, reference)


def test_param_groups_with_their_own_hyperparameters_and_a_scheduler():
    params = _params()
    reference = _clone(params)

    def groups(ps):
        return [dict(params=ps[:3], lr=1e-2, weight_decay=0.0), dict(params=ps[3:], lr=3e-3, betas=(0.85, 0.99))]

    ours, theirs = FusedAdamW(groups(params)), torch.optim.AdamW(groups(reference))
    ours_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(ours, T_max=50)
    theirs_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=50)
    _run(ours, params, 60, scheduler=ours_schedule)
    _run(theirs, reference, 60, scheduler=theirs_schedule)
    assert_params_close(params, reference)
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups]


def test_add_param_group_and_parameters_without_gradients():
    params = _params()
    reference = _clone(params)
    ours, theirs = FusedAdamW(params[:4], lr=1e-2), torch.optim.AdamW(reference[:4], lr=1e-2)
    _run(ours, params[:4], 5, skip={1})
    _run(theirs, reference[:4], 5, skip={1})
    assert not ours.state[params[1]] and torch.equal(params[1], reference[1])  # never had a grad: untouched
    ours.add_param_group(dict(params=params[4:], lr=5e-3))
    theirs.add_param_group(dict(params=reference[4:], lr=5e-3))
    _run(ours, params, 10, start=5, skip={2})
    _run(theirs, reference, 10, start=5, skip={2})
    assert_params_close(params, reference)


@pytest.mark.parametrize("direction", ["torch->fused", "fused->torch"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trip_continues_identically(direction, amsgrad):
    params = _params()
    first_cls, second_cls = (torch.optim.AdamW, FusedAdamW) if direction == "torch->fused" else (FusedAdamW, torch.optim.AdamW)
    first = first_cls(params, lr=1e-2, amsgrad=amsgrad)
    _run(first, params, 10)
    saved = copy.deepcopy(first.state_dict())  # as if saved to disk: shares no tensor with `first`

    resumed_params = _clone(params)
    resumed = second_cls(resumed_params, lr=1e-2, amsgrad=amsgrad)
    resumed.load_state_dict(saved)
    _run(first, params, 10, start=10)  # the run that never stopped
    _run(resumed, resumed_params, 10, start=10)
    assert_params_close(resumed_params, params)
    assert set(resumed.state_dict()["state"][3]) == set(saved["state"][3])
    assert resumed.state_dict()["param_groups"][0].keys() == saved["param_groups"][0].keys()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_parameters_keep_fp32_state(dtype):
    """fp16/bf16 parameters update in fp32 from fp32 state: against an fp32 run, their error is at
    most twice that of torch's AdamW on the same low-precision parameters (which keeps its state
    in their dtype)."""
    params = _params(dtype=dtype, shapes=[(1000,), (33, 5)])
    torch_params = _clone(params)
    master = [p.detach().float().requires_grad_() for p in params]
    optimizers = [FusedAdamW(params, lr=1e-2), torch.optim.AdamW(torch_params, lr=1e-2),
                  torch.optim.AdamW(master, lr=1e-2)]
    for step in range(20):
        _set_grads(master, step)
        for p, q, m in zip(params, torch_params, master):
            p.grad, q.grad = m.grad.to(dtype), m.grad.to(dtype)
        for optimizer in optimizers:
            optimizer.step()
    assert optimizers[0].state[params[0]]["exp_avg"].dtype == torch.float32
    for p, q, m in zip(params, torch_params, master):
        assert p.dtype == dtype
        assert_close_to_exact(p.detach(), q.detach(), m.detach().double(), what="parameter")


def test_sparse_gradients_are_refused():
    weight = torch.nn.Parameter(torch.randn(10, 3))
    optimizer = FusedAdamW([weight])
    weight.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 3), (10, 3))
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


def test_capturable_is_refused():
    with pytest.raises(ValueError, match="capturable"):
        FusedAdamW([torch.nn.Parameter(torch.randn(3))], capturable=True)


def test_drop_in_in_a_training_loop():
    """The same model trained with each optimizer gives the same losses."""
    def train(optimizer_cls):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
        optimizer = optimizer_cls(model.parameters(), lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
        data = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
        target = data.sum(1, keepdim=True)
        losses = []
        for _ in range(30):
            loss = torch.nn.functional.mse_loss(model(data), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        return losses

    fused, plain = train(FusedAdamW), train(torch.optim.AdamW)
    assert fused[-1] < fused[0] / 5
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-5, atol=1e-6)


def test_the_compiled_extension_is_in_use():
    module = extension.load()
    assert module is not None
    if os.environ.get("ENGINE_STRICT") == "1" and torch.version.cuda is not None:
        assert module.cuda_built(), "CI must compile the CUDA half of the extension"
    params = _params()
    with count_launches() as launches:
        optimizer = FusedAdamW(params)
        _run(optimizer, params, 1)
    assert launches == {"adamw_step_cpu": 1}


def test_without_the_extension_it_warns_and_matches_torch(monkeypatch):
    monkeypatch.setattr(extension, "_module", None)
    monkeypatch.setattr(extension, "_failure", "RuntimeError: no compiler")
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.delenv("ENGINE_STRICT", raising=False)
    params = _params()
    reference = _clone(params)
    ours, theirs = FusedAdamW(params), torch.optim.AdamW(reference)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        _run(ours, params, 3)
    _run(theirs, reference, 3)
    assert_params_close(params, reference)
    monkeypatch.setenv("ENGINE_STRICT", "1")
    monkeypatch.setattr(backend, "_warned", set())
    with pytest.raises(RuntimeError, match="ENGINE_STRICT"):
        ours.step()


def test_bias_correction_uses_each_parameters_own_step():
    """A parameter whose gradient appears later is corrected for its own step count, as torch does."""
    params = _params(shapes=[(5,), (6,)])
    reference = _clone(params)
    ours, theirs = FusedAdamW(params), torch.optim.AdamW(reference)
    _run(ours, params, 3, skip={1})
    _run(theirs, reference, 3, skip={1})
    with count_launches() as launches:
        _run(ours, params, 2, start=3)
    _run(theirs, reference, 2, start=3)
    assert launches["adamw_step_cpu"] == 2  # one call per step: each tensor's step count is read by the kernel
    assert ours.state[params[1]]["step"].item() == 2 and math.isclose(ours.state[params[0]]["step"].item(), 5)
    assert ours.state[params[0]]["step"].dtype == torch.float32
    assert_params_close(params, reference)


def test_loading_keeps_fp32_moments_for_low_precision_parameters():
    params = _params(dtype=torch.bfloat16, shapes=[(1000,)])
    optimizer = FusedAdamW(params, amsgrad=True)
    _run(optimizer, params, 3)
    saved = copy.deepcopy(optimizer.state_dict())
    restored = FusedAdamW(_clone(params), amsgrad=True)
    restored.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        original = optimizer.state[params[0]][key]
        loaded = next(iter(restored.state.values()))[key]
        assert loaded.dtype == torch.float32 and torch.equal(loaded, original), key


@pytest.mark.parametrize("archs, capability, runs", [
    ("8.0;9.0+PTX", (8, 0), True), ("8.0;9.0+PTX", (8, 6), True), ("8.0;9.0+PTX", (9, 0), True),
    ("8.0;9.0+PTX", (10, 0), True), ("8.0;9.0+PTX", (7, 5), False), ("8.0", (9, 0), False), ("8.6", (8, 0), False),
])
def test_which_gpus_a_build_runs_on(archs, capability, runs):
    assert extension._covers(archs, capability) is runs


# --- GradScaler: the optimizer unscales and skips by itself, as torch's fused AdamW ---------------

def _scaled_steps(optimizer_cls, params, device, steps, overflow_at, *, unscale_first=False, **options):
    """Train ``params`` under a GradScaler; the gradients of the steps in ``overflow_at`` hold an inf.
    Returns (the gradients each step left behind, the scales, host reads during scaler.step)."""
    optimizer = optimizer_cls(params, lr=1e-2, **options)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
    left_grads, scales, reads = [], [], Counter()
    for step in range(steps):
        optimizer.zero_grad()
        loss = sum((p.float() * torch.linspace(-1, 1, p.numel(), device=device).view(p.shape)).sum() * (step + 1)
                   for p in params)
        if step in overflow_at:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(optimizer)
        with count_host_reads() as step_reads:
            scaler.step(optimizer)
        reads += step_reads
        scaler.update()
        left_grads.append([p.grad.clone() for p in params])
        scales.append(scaler.get_scale())
    return optimizer, left_grads, scales, reads


@pytest.mark.parametrize("fused", [None, True])  # fused=True made torch's base class hand over the scale
@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler-step", "unscale-then-step"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_grad_scaler_matches_torch_fused_adamw(device, amsgrad, unscale_first, fused):
    """With and without overflow: skipped steps change nothing (step counts included), good steps
    use (and leave behind) the unscaled gradients, like torch.optim.AdamW(fused=True)."""
    params = [p.to(device).detach().requires_grad_() for p in _params(shapes=[(7,), (33, 5), (1000,)])]
    reference = _clone(params)
    plain = _clone(params)
    overflow_at = {1, 4, 5}
    ours, our_grads, our_scales, reads = _scaled_steps(FusedAdamW, params, device, 8, overflow_at,
                                                       unscale_first=unscale_first, amsgrad=amsgrad, fused=fused)
    theirs, their_grads, their_scales, _ = _scaled_steps(torch.optim.AdamW, reference, device, 8, overflow_at,
                                                         unscale_first=unscale_first, amsgrad=amsgrad, fused=True)
    _scaled_steps(torch.optim.AdamW, plain, device, 8, overflow_at, unscale_first=unscale_first, amsgrad=amsgrad)
    assert our_scales == their_scales
    assert reads.total() == 0  # the skip decision stays on the device
    for ours_left, theirs_left in zip(our_grads, their_grads):
        for g, h in zip(ours_left, theirs_left):
            torch.testing.assert_close(g, h, rtol=0, atol=0, equal_nan=True)
    assert_params_close(params, reference)  # torch's fused kernel and its unfused one round alike here
    assert_params_close(params, plain)
    for p, q in zip(params, reference):
        assert ours.state[p]["step"].item() == theirs.state[q]["step"].item() == 8 - len(overflow_at)
        assert ours.state[p]["step"].device == p.device


def test_grad_scaler_with_every_step_overflowing_leaves_everything_untouched():
    params = _params(shapes=[(7,), (1000,)])
    before = _clone(params)
    optimizer, _, scales, _ = _scaled_steps(FusedAdamW, params, "cpu", 3, {0, 1, 2})
    assert scales == [2.0**9, 2.0**8, 2.0**7]
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert all(state["step"].item() == 0 and not state["exp_avg"].any() for state in optimizer.state.values())


def test_grad_scaler_without_the_extension_unscales_and_skips_too(monkeypatch):
    monkeypatch.setattr(extension, "_module", None)
    monkeypatch.setattr(extension, "_failure", "RuntimeError: no compiler")
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.delenv("ENGINE_STRICT", raising=False)
    params = _params(shapes=[(7,), (33, 5)])
    reference = _clone(params)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        _scaled_steps(FusedAdamW, params, "cpu", 6, {2, 3})
    _scaled_steps(torch.optim.AdamW, reference, "cpu", 6, {2, 3})
    assert_params_close(params, reference)


# --- layouts: channels_last and strided parameters -----------------------------------------------

def _layouts(device="cpu"):
    generator = torch.Generator().manual_seed(5)
    conv = torch.randn(8, 3, 5, 5, generator=generator).to(device).to(memory_format=torch.channels_last)
    conv3d = torch.randn(4, 2, 3, 3, 3, generator=generator).to(device).to(memory_format=torch.channels_last_3d)
    transposed = torch.randn(37, 11, generator=generator).to(device).t()  # dense, column-major
    strided = torch.randn(20, 12, generator=generator).to(device)[:, ::3]  # not dense: a view with gaps
    return [torch.nn.Parameter(t) for t in (conv, conv3d, transposed, strided)]


def test_channels_last_and_strided_parameters_match_torch_and_stay_in_place(device):
    params = _layouts(device)
    reference = [torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format)) for p in params]
    storage = [p.data_ptr() for p in params]
    ours, theirs = FusedAdamW(params, lr=1e-2, amsgrad=True), torch.optim.AdamW(reference, lr=1e-2, amsgrad=True)
    _run(ours, params, 20)
    _run(theirs, reference, 20)
    assert_params_close(params, reference)
    assert [p.data_ptr() for p in params] == storage
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    for p in params[:3]:  # dense layouts: stepped in place, moments in the parameter's own layout
        p.grad = torch.randn_like(p)
        assert _Lane(p, p.grad).param is p
        assert ours.state[p]["exp_avg"].stride() == p.stride()
    params[3].grad = torch.randn_like(params[3])
    assert _Lane(params[3], params[3].grad).param is not params[3]  # the strided view goes through a copy


def test_gradient_in_another_layout_than_its_parameter():
    param = torch.nn.Parameter(torch.randn(6, 4, 3, 3).to(memory_format=torch.channels_last))
    reference = torch.nn.Parameter(param.detach().clone())
    ours, theirs = FusedAdamW([param], lr=1e-2), torch.optim.AdamW([reference], lr=1e-2)
    for step in range(5):
        grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(step))  # contiguous
        param.grad, reference.grad = grad, grad.clone()
        ours.step()
        theirs.step()
    assert_params_close([param], [reference])


def test_clip_grad_norm_runs_fused_on_channels_last_gradients():
    params = _layouts()[:3]
    for p in params:
        p.grad = torch.randn_like(p)  # randn_like keeps each parameter's layout
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, reference):
        q.grad = p.grad.clone()
    with count_launches() as launches:
        total = clip_grad_norm_(params, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(reference, 0.5)
    assert launches == {"grad_norm_cpu": 1, "grad_scale_cpu": 1}
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
