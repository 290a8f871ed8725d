"""offload: run giant Mixture-of-Experts models on one workstation, experts split between GPU and CPU."""

import os
import sys

from offload.errors import OffloadError

# torch's CPU thread pool (OpenMP) spins between parallel regions by default. On a machine whose cores are
# shared (with numba's expert kernels, other processes) spinning workers lose their turn to the scheduler and
# every small op waits for them: measured on a loaded 2-core box, a 1 GiB GLM-DSA GGUF decoded 0.9-2.9 tok/s
# spinning vs 9-17 tok/s with sleeping workers, and the first token came 2x sooner. Read by OpenMP when
# torch loads it, so it applies when offload is imported before torch; OMP_WAIT_POLICY=ACTIVE restores spinning.
_OMP_WAIT_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torch imported first: its OpenMP already read the default (spinning) and the setting above comes too late
_TORCH_SPINS = _OMP_WAIT_POLICY_SET_HERE and "torch" in sys.modules

__version__ = "0.1.0"


def load(path, device: str = "auto", **kwargs):
    """Load a Hugging Face checkpoint directory (or a GGUF file) and return an `LLM`.

    device: "auto" (CUDA if available, else CPU), "cpu" or "cuda".
    """
    import gc

    # The first load imports torch (~250k long-lived objects) and every load builds a vocabulary: with the
    # collector on, its full passes rescan all of them several times (0.3-0.4 s measured on a 2-core box).
    # So: collector off while loading, and the imported modules' objects, which live as long as the
    # process, moved out of its sight (gc.freeze) the first time.
    enabled = gc.isenabled()
    gc.disable()
    try:
        first = "offload.api" not in sys.modules
        from offload.api import load as _load

        if first and enabled:
            gc.freeze()
        llm = _load(path, device=device, **kwargs)
    finally:
        if enabled:
            gc.enable()
    if _TORCH_SPINS and _cpu_computes(llm.plan):
        import warnings

        warnings.warn("torch was imported before offload, so its OpenMP threads spin between ops and take the "
                      "cores from the CPU expert kernels (their calls ran 1.2-1.5x slower so on a 2-core box): "
                      "import offload first, or set OMP_WAIT_POLICY=PASSIVE before starting Python",
                      RuntimeWarning, stacklevel=2)
    return llm


def _cpu_computes(plan: dict) -> bool:
    """Whether the plan leaves layers or routed experts on the CPU (not only the embedding table)."""
    cpu = [d.get("by_class", {}) for d in plan.get("devices", []) if d.get("name") == "cpu"]
    return any(c.get(k, 0) for c in cpu for k in ("routed_experts", "attention", "dense_ffn", "shared_experts"))


__all__ = ["load", "OffloadError", "__version__"]
