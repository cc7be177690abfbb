import os
import platform
import resource
import subprocess
import sys

import pytest
import torch

from nst_lightning.run import runtime
from nst_lightning.run.runtime import (
    ALLOCATOR_VARIABLES,
    keep_freed_memory,
    physical_cores,
    set_default_threads,
)


def test_physical_cores_is_a_positive_count():
    assert 1 <= physical_cores() <= (torch.get_num_threads() + 1024)


def test_threads_default_to_physical_cores_unless_the_user_set_them(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        assert set_default_threads() == physical_cores() == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(before)
        assert set_default_threads() is None
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def _page_faults_of_a_fresh_block() -> int:
    """Minor page faults while a 64 MiB tensor is allocated and written (the size of a 512 px activation)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(16 * 2**20)
    block.fill_(1.0)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_freed_memory_is_reused_without_page_faults(monkeypatch):
    for name in (*ALLOCATOR_VARIABLES, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    assert keep_freed_memory()
    # Served by a fresh mmap, as glibc does by default, every block faults its 16,384 pages in again.
    # From the heap, a block soon reuses a freed one's pages (the first cycles grow the heap and
    # settle the blocks' alignment slack).
    faults = [_page_faults_of_a_fresh_block() for _ in range(8)]
    assert min(faults) < 1000, faults


_RETURNED_BLOCK_PROBE = """
import torch
from nst_lightning.run.runtime import keep_freed_memory, return_freed_memory

def address_space():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))

def grown_and_left(mib):
    before = address_space()
    block = torch.empty(mib * 2**18)
    block.fill_(1.0)
    grown = address_space() - before
    del block
    return grown, address_space() - before

assert keep_freed_memory()
kept = grown_and_left(256)
assert return_freed_memory()
returned = grown_and_left(256)
print(kept[1] >> 20, returned[0] >> 20, returned[1] >> 20, return_freed_memory())
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_a_tight_run_gives_freed_memory_back():
    # Under ulimit -v what counts is the address space: a kept heap never shrinks, a returned block's goes at once.
    # A fresh process: in the suite's own, a hole left by an earlier test can hold the block without a new mapping.
    env = {k: v for k, v in os.environ.items() if k not in (*ALLOCATOR_VARIABLES, "LD_PRELOAD")}
    probe = subprocess.run(
        [sys.executable, "-c", _RETURNED_BLOCK_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert probe.returncode == 0, probe.stderr
    kept_left, returned_grown, returned_left, again = probe.stdout.split()
    assert int(kept_left) >= 250, "the kept heap holds the freed block"
    assert int(returned_grown) >= 250, "a returned block is a mapping of its own"
    assert int(returned_left) < 4, "and it goes when it is freed"
    assert again == "False", "once is enough"


def test_the_allocator_is_left_alone_where_the_user_tunes_it(monkeypatch):
    for name in (*ALLOCATOR_VARIABLES, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert not keep_freed_memory()
    monkeypatch.delenv("MALLOC_MMAP_MAX_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert not keep_freed_memory()


@pytest.mark.parametrize("amx", [True, False])
def test_automatic_precision_is_bf16_mixed_only_on_a_cpu_with_amx(monkeypatch, amx):
    monkeypatch.setattr(runtime, "cpu_has_amx_bf16", lambda: amx)
    assert runtime.automatic_precision("cpu") == ("bf16-mixed" if amx else None)
    assert runtime.automatic_precision("gpu") is None


def test_automatic_precision_leaves_a_gpu_run_at_float32(monkeypatch):
    from lightning.pytorch.accelerators import CUDAAccelerator

    monkeypatch.setattr(runtime, "cpu_has_amx_bf16", lambda: True)
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    assert runtime.automatic_precision("auto") is None


def test_amx_detection_answers_a_bool():
    assert isinstance(runtime.cpu_has_amx_bf16(), bool)


def test_the_gpu_default_precision_is_one_setting(monkeypatch):
    from lightning.pytorch.accelerators import CUDAAccelerator

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    monkeypatch.setattr(runtime, "bf16_is_native_on_gpu", lambda: True)
    assert runtime.runs_on_cuda("auto") and runtime.runs_on_cuda("gpu") and not runtime.runs_on_cuda("cpu")
    assert runtime.GPU_PRECISION is None and runtime.automatic_precision("gpu") is None  # until measured
    monkeypatch.setattr(runtime, "GPU_PRECISION", "bf16-mixed")
    assert runtime.automatic_precision("gpu") == runtime.automatic_precision("auto") == "bf16-mixed"
    monkeypatch.setattr(runtime, "bf16_is_native_on_gpu", lambda: False)  # before Ampere: emulated
    assert runtime.automatic_precision("gpu") is None


def test_an_address_space_limit_bounds_the_memory_available(monkeypatch):
    """Under ``ulimit -v`` the memory estimate must compare with what the limit leaves, not with the machine's."""
    import resource

    from nst_lightning.run import runtime

    unlimited = runtime.available_bytes("cpu")
    held = runtime._meminfo("/proc/self/status", "VmSize:")
    assert unlimited and held
    monkeypatch.setattr(resource, "getrlimit", lambda which: (held + 2**30, resource.RLIM_INFINITY))
    assert runtime.available_bytes("cpu") <= min(unlimited, 2**30)
