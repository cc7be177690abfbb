"""Process-wide runtime settings: the number of CPU threads torch uses."""

from __future__ import annotations

import os
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
