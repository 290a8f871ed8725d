"""Shared fixtures for the placement tests."""

from offload.placement.hardware import GPU, GiB, Hardware


def rig(gpus=(24,), ram=512, dram=300, pcie=25, cores=32) -> Hardware:
    return Hardware(gpus=[GPU(f"GPU{i}", int(g * GiB), 1000e9, 150) for i, g in enumerate(gpus)],
                    ram_bytes=int(ram * GiB), dram_bw=dram * 1e9, pcie_bw=pcie * 1e9, cpu_cores=cores,
                    cpu_flags=["avx512f"])
