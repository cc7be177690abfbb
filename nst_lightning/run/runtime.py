"""The machine and the process: CPU cores and features, free memory, torch's threads, how freed memory is
kept, how much Lightning says. (Read from /proc and /sys: facts about the machine, not user files.)"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

# Environment variables through which a user sets the thread count themselves.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def physical_cores() -> int:
    """Physical CPU cores this process may run on (hyper-threads of one core count once).

    Read from Linux's sysfs topology for the CPUs in the process's affinity mask; elsewhere, or if
    that cannot be read, the number of usable logical CPUs.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            return max(len(cpus), 1)
    return max(len(cores), 1)


def set_default_threads() -> int | None:
    """Sets torch's intra-op threads to the physical cores, unless the user chose a number through
    ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``. Returns the number set, or None if left alone.

    One thread per physical core is the fastest setting for the convolutions here: a second
    hyper-thread per core only competes for the same vector units.
    """
    if any(os.environ.get(name) for name in THREAD_VARIABLES):
        return None
    import torch

    threads = physical_cores()
    torch.set_num_threads(threads)
    return threads


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# Blocks from this size up get a mapping of their own once freed memory is returned (return_freed_memory).
RETURNED_BLOCK_BYTES = 2**20
_kept: list[object] = []  # glibc (its ctypes handle), once keep_freed_memory has applied its setting
# Environment variables through which a user tunes glibc's allocator (or replaces it) themselves.
ALLOCATOR_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Makes glibc's allocator keep freed memory for reuse instead of returning it to the system.

    Every iteration allocates and frees the same activations and gradients (hundreds of MB at
    512 px). By default glibc serves each block over 32 MiB with a fresh ``mmap`` and unmaps it when
    it is freed, and gives the top of the heap back beyond 128 KiB, so every iteration page-faults
    its memory in again, and the kernel zeroes each page: about 90,000 page faults per iteration at
    512 px, some 3% of its time. Serving every block from the heap and never trimming it makes the
    second iteration onwards reuse the first one's memory (no page faults). The peak memory is the
    same; the process keeps it until it exits.

    Left alone where the user tunes the allocator (``MALLOC_*_`` variables) or preloads another one
    (``LD_PRELOAD``), and off glibc. Returns whether the setting was applied.
    """
    if any(os.environ.get(name) for name in ALLOCATOR_VARIABLES) or os.environ.get("LD_PRELOAD"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        return False
    _kept[:] = [libc]
    return True


def return_freed_memory() -> bool:
    """Undoes :func:`keep_freed_memory` (until it is called again): each block of a MiB or more gets a mapping of
    its own, unmapped when it is freed, and the heap's free top goes back to the system now and from then on.

    For a tight run (``StyleTransfer.setup``: the plan tiles it or shortens its L-BFGS history). The kept heap never
    shrinks, and its holes are the wrong sizes for later tensors: under ``ulimit -v 12000000`` the print config's
    3000 px scale ran out of address space after its 2048 px scale, and a 3000 px run alone over 768 px tiles at its
    second iteration, each estimated to fit; handed back, the same runs peaked gigabytes below their estimates. The
    page faults come back, and with them the kernel's zeroing of every page (``benchmarks/allocator.py``: 1.3 times
    the time of a tiled evaluation at 1536 px). Returns whether anything changed (only after
    :func:`keep_freed_memory` applied its setting)."""
    if not _kept:
        return False
    import ctypes

    libc = _kept.pop()
    mallopt = libc.mallopt
    mallopt(_M_MMAP_THRESHOLD, RETURNED_BLOCK_BYTES)
    mallopt(_M_MMAP_MAX, 65536)  # glibc's default
    mallopt(_M_TRIM_THRESHOLD, 128 * 1024)  # glibc's default
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    libc.malloc_trim(0)
    return True


def cpu_has_amx_bf16() -> bool:
    """Whether torch can multiply bfloat16 matrices in this CPU's AMX tiles (Intel Xeon since
    Sapphire Rapids), as torch itself reports it (the kernel must allow the tiles too)."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.6
    if capabilities is None:
        return False
    try:
        return bool(capabilities().get("amx_bf16"))
    except (RuntimeError, AttributeError):
        return False


def _runs_on_cpu(accelerator: object) -> bool:
    if accelerator == "cpu":
        return True
    if accelerator != "auto":  # gpu, cuda, mps, an Accelerator instance ...
        return False
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    return not (CUDAAccelerator.is_available() or MPSAccelerator.is_available())


def runs_on_cuda(accelerator: object) -> bool:
    """Whether a run with this ``trainer.accelerator`` runs on a CUDA GPU: ``gpu``/``cuda``, a CUDA
    accelerator instance, or ``auto`` where torch sees one (Lightning's own order)."""
    from lightning.pytorch.accelerators import CUDAAccelerator

    if isinstance(accelerator, CUDAAccelerator) or accelerator == "cuda":
        return True
    if accelerator not in ("gpu", "auto"):
        return False
    return CUDAAccelerator.is_available()


GPU_PRECISION: str | None = None
"""The ``trainer.precision`` of a CUDA run that sets none, on a GPU that computes bfloat16 natively
(compute capability 8.0 or later): None keeps Lightning's 32-true.

This is the one place to change the GPU default. bf16-mixed did not make a 512 px run faster on an H200
(15.5 s against 15.4 s for 300 iterations, issue 22: the loop is not bound by the convolutions there),
so it stays off until a measurement shows it faster with an image as good: ``benchmarks/gpu.sh`` measures
both (seconds per iteration, whole-command time, final loss against 32-true) in one run. To switch, set
this to ``"bf16-mixed"``; :func:`~nst_lightning.run.precision.choose_precision` then says so in its note."""


def automatic_precision(accelerator: object) -> str | None:
    """The ``trainer.precision`` for a run that sets none: ``bf16-mixed`` where the run is on a CPU
    with AMX, :data:`GPU_PRECISION` on a GPU with native bfloat16, else None (Lightning's 32-true).

    On such a CPU bfloat16 convolutions run 3-8x faster than float32 ones, and a whole 512 px
    iteration about 2.3x faster (README, Mixed precision); the module finishes the run in float32
    (``model.float32_final_steps``), which reached the float32 run's loss. GPUs keep 32-true until
    bf16 is measured faster there (:data:`GPU_PRECISION`).
    """
    if _runs_on_cpu(accelerator):
        return "bf16-mixed" if cpu_has_amx_bf16() else None
    if GPU_PRECISION is not None and runs_on_cuda(accelerator) and bf16_is_native_on_gpu():
        return GPU_PRECISION
    return None


def bf16_is_native_on_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's own test: AVX-512 BF16/AMX on x86, the BF16
    extension on Arm); elsewhere torch emulates it, many times slower than float32."""
    import torch

    # Private torch API: there is no public query of oneDNN's bfloat16 support (torch.cpu.get_capabilities
    # names CPU flags, not what oneDNN makes of them). Pinned by tests/test_private_api.py.
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_is_native_on_gpu() -> bool:
    """Whether the current CUDA GPU computes bfloat16 natively (compute capability 8.0, Ampere, or later; any ROCm
    GPU): torch's own test without the emulation it otherwise counts as support."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def available_bytes(device: str = "cpu") -> int | None:
    """Memory a new allocation can still get: on a CPU the least of ``MemAvailable`` (/proc/meminfo), what an
    address-space limit (``ulimit -v``) and a container's memory limit leave; on CUDA the free memory of the
    current GPU; None where it cannot be told."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    limits = [_meminfo("/proc/meminfo", "MemAvailable:"), _address_space_left(), _cgroup_left()]
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def _meminfo(path: str, key: str) -> int | None:
    """A ``key: N kB`` line of a /proc file, in bytes."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _address_space_left() -> int | None:
    """What ``ulimit -v`` (RLIMIT_AS) leaves this process: the limit less the address space it holds already."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    used = _meminfo("/proc/self/status", "VmSize:")
    return None if limit == resource.RLIM_INFINITY or used is None else max(0, limit - used)


def _cgroup_left() -> int | None:
    """What the container's memory limit (cgroup v2 ``memory.max``) leaves, where one is set."""
    try:
        folder = Path("/sys/fs/cgroup")
        limit = (folder / "memory.max").read_text().strip()
        return None if limit == "max" else max(0, int(limit) - int((folder / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info lines (devices, seed, tips, "Trainer.fit stopped") off inside: for a
    throw-away Trainer, and for a batch, which prints a line per pair instead. Warnings still show."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
