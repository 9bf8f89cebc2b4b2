"""FusedAdamW and clip_grad_norm_ on FSDP2's DTensor parameters (2 CPU processes under torchrun,
gloo): the local shards stepped by the extension equal one unsharded process over 10 steps
within 1e-5, and the clip's global norm (2 and inf, one all-reduce) equals torch's on the same
sharded model. The checks are in fsdp_worker.py."""

import os
import subprocess
import sys
from pathlib import Path


def test_fsdp2_sharded_steps_and_clip_match_one_process():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(Path(__file__).with_name("fsdp_worker.py"))], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("FSDP2 matches one process") == 2
