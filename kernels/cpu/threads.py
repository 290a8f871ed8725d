"""The one owner of CPU threads: the native kernels' pool (csrc/qdot.cpp), numba's pool and torch's
OpenMP / MKL pool (matmuls).

Both pools get the same count, one thread per physical core (hyper-threads share the core's load
ports and add nothing to a bandwidth-bound GEMV). The pools never run at the same time: moe_cpu
calls numba and torch one after the other, so the same cores serve both without oversubscription.

NUMA: we do not pin threads or pages. On a machine with several NUMA nodes, run the process under
`numactl --interleave=all` so the experts' pages are spread over every node's memory controllers
and all sockets' cores stream at the sum of their bandwidths; `numa_nodes()` reports the layout and
`set_threads` counts the physical cores of every node the process may run on. (Per-node expert
placement with node-local thread teams, as KTransformers does, is future work.)
"""

import os
from pathlib import Path

_threads: int | None = None


def physical_cores() -> int:
    """Physical cores this process may run on (affinity mask respected, hyper-threads not counted)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        phys = psutil.cpu_count(logical=False) or allowed
        logical = psutil.cpu_count(logical=True) or allowed
        per_core = max(1, logical // phys)
    except Exception:
        per_core = 1
    return max(1, allowed // per_core)


def numa_nodes() -> dict[int, str]:
    """{node id: cpulist} from sysfs; {} where the kernel exposes none."""
    nodes = {}
    for p in sorted(Path("/sys/devices/system/node").glob("node[0-9]*")):
        try:
            nodes[int(p.name[4:])] = (p / "cpulist").read_text().strip()
        except OSError:
            pass
    return nodes


def set_threads(n: int | None = None) -> int:
    """Give the native pool, numba and torch `n` threads each (default: physical cores); returns the count."""
    global _threads
    n = int(n) if n else physical_cores()
    if n < 1:
        from offload.errors import ConfigError

        raise ConfigError(f"threads must be >= 1, got {n}")
    os.environ["OMP_NUM_THREADS"] = str(n)  # for OpenMP runtimes not yet started (children, MKL)
    os.environ["MKL_NUM_THREADS"] = str(n)
    import numba
    import torch

    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    _threads = n
    from offload.kernels.cpu import native

    native.set_threads(n)  # a no-op until the native library is loaded (it then asks get_threads)
    return n


def get_threads() -> int:
    """Threads in use; sets the default on first call."""
    return _threads if _threads is not None else set_threads()
