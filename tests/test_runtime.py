import platform
import subprocess
import sys

import pytest

# Six forward+backward steps of a MoE layer; print the minor page faults of each.
_PROBE = """
import resource, sys, torch
from multimodal_moe import runtime
from multimodal_moe.layers import TopKMoEConfig
applied = runtime.keep_freed_memory() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
# expert weight gradients of 64 MiB each: above glibc's largest dynamic mmap threshold (32 MiB)
moe = TopKMoEConfig(hidden_dim=2048, num_experts=16, top_k=2).build(512)
x = torch.randn(4, 128, 512)
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    moe.zero_grad(set_to_none=True)
    moe(x).hidden.sum().backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, *[faults_of_one_step() for _ in range(6)])
"""


def _steady_state_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    applied, *faults = out.stdout.split()
    return applied, min(map(int, faults[-3:]))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning exists only for glibc")
def test_freed_memory_is_reused_without_page_faults():
    _, default_faults = _steady_state_faults("default")
    applied, kept_faults = _steady_state_faults("keep")
    assert applied == "True"
    assert default_faults > 30_000  # two 64 MiB gradients in fresh 4 KiB pages, every step
    assert kept_faults < 100

