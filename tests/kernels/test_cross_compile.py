"""Every Triton kernel compiles for real GPUs (sm_90: H100/H200; sm_86: 99 KiB of shared memory per
program) with Triton's own compiler, no GPU needed: what the CPU interpreter cannot show."""

import json
import os
import subprocess
import sys

import pytest
import torch

from engine.kernels.attention import tiles

KERNELS = {"_norm_fwd_kernel", "_norm_bwd_kernel", "_column_sum_kernel", "_attn_fwd_kernel", "_attn_bwd_delta_kernel",
           "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_dropout_mask_kernel", "_decode_split_kernel",
           "_decode_combine_kernel", "_cross_entropy_kernel", "_glu_kernel", "_rotary_kernel", "_block_states_kernel",
           "_derivative_probe_kernel"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("cross") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "engine", "cross-compile", "--arch", "90", "86", "--quick",
                          "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text()), run.stdout


@pytest.mark.parametrize("arch", [90, 86])
def test_every_kernel_compiles_and_every_case_fits(compiled, arch):
    results = [r for r in compiled[0] if r["arch"] == arch]
    assert results and all(r["error"] is None for r in results)
    assert {p["kernel"] for r in results for p in r["programs"]} == KERNELS
    for r in results:
        loaded = [p for p in r["programs"] if p["fits"]]
        assert loaded, f"{r['case']}: nothing fitted"
        assert all(p["registers"] and p["registers"] <= 255 for p in loaded)  # ptxas's output was read


@pytest.mark.parametrize("arch", [90, 86])
def test_every_config_of_a_list_is_compiled_and_none_that_fits_spills_much(compiled, arch):
    """What a GPU would time: each configuration of the lists (here bf16 head dim 128's forward,
    dK/dV and, for the deterministic backward, dQ lists); no loadable program spills more than
    64 bytes per thread."""
    results = {r["case"]: r for r in compiled[0] if r["arch"] == arch}
    for case, kernels in (("attention bfloat16 head_dim 128", {"forward": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel"}),
                          ("attention bfloat16 head_dim 128, deterministic backward", {"dq": "_attn_bwd_dq_kernel"})):
        for kind, kernel in kernels.items():
            expected = {(t["BLOCK_M"], t["BLOCK_N"], t["num_warps"], t["num_stages"])
                        for t in tiles.gpu_tiles(128, torch.bfloat16, kind)}
            got = {(p["tile"]["BLOCK_M"], p["tile"]["BLOCK_N"], p["num_warps"], p["num_stages"])
                   for p in results[case]["programs"] if p["kernel"] == kernel}
            assert got == expected, (case, kind)
    spills = [(r["case"], p["kernel"], p["tile"], p["stack"]) for r in results.values() for p in r["programs"]
              if p["fits"] and p["stack"] > 64]
    assert spills == []


def test_configs_are_too_big_only_where_shared_memory_is_short(compiled):
    too_big = {arch: [(r["case"], p["kernel"]) for r in compiled[0] if r["arch"] == arch
                      for p in r["programs"] if not p["fits"]] for arch in (90, 86)}
    assert too_big[90] == []
    # 16-bit head dim 256: the forward's 64 x 64 tile needs 104 KiB, more than sm_86's 99 KiB
    assert ("attention bfloat16 head_dim 256", "_attn_fwd_kernel") in too_big[86]


def test_report_names_the_gpus(compiled):
    report = compiled[1]
    assert "sm_90 (H100, H200; 227 KiB shared memory per program)" in report
    assert "0 failed" in report and "too big: never loaded" in report


def test_the_forward_is_compiled_with_descriptor_loads_only_where_the_gpu_has_tma(compiled):
    """sm_90 compiles each forward tile twice (tensor descriptors and pointer loads: a GPU times
    both); sm_86 has no TMA and gets pointer loads only. Packed batches never use descriptors."""
    forward = {arch: {r["case"]: [p for p in r["programs"] if p["kernel"] == "_attn_fwd_kernel"]
                      for r in compiled[0] if r["arch"] == arch} for arch in (90, 86)}
    case = "attention bfloat16 head_dim 128"
    expected = len(tiles.gpu_tiles(128, torch.bfloat16, "forward"))
    assert sum(p["tma"] for p in forward[90][case]) == sum(not p["tma"] for p in forward[90][case]) == expected
    assert not any(p["tma"] for programs in forward[86].values() for p in programs)
    assert not any(p["tma"] for p in forward[90]["attention float16 head_dim 64, packed variable lengths"])
    assert "x128 TMA" in compiled[1]
