"""What a GPU home holds of a tensor, as the loader keeps it (measured with offload.held_bytes on the loaded
fixtures, tests/engine/test_held_bytes.py), where that differs from the bytes the file stores:

- matrices stay in their storage format where the Triton kernels multiply it at that width (TRITON_COLS);
  any other matrix is expanded to the load's float dtype (bf16 on a GPU);
- MLA's kv_b (a GGUF's attn_k_b + attn_v_b) is held as float W_UK / W_UV (offload.models.mla), whatever its type;
- norms and router weights are float tensors in the load dtype; the router's score bias and the DSA indexer's
  weights_proj are float32.
Routed experts are held as stored (Triton blocks, or blocks expanded per matmul).

A CPU home holds matrices as stored (the native kernels' blocks; IQ4_NL as Q8_0: quant.held_on_cpu) and its float
tensors in the load's dtype (float32 for a GGUF on a CPU-only machine, bf16 where a GPU computes); MLA's kv_b both
as float W_UK / W_UV and as the file's per-head blocks (LoadContext.heads). `cpu_bytes` gives (bytes, float
elements): the home holds bytes + elements x the load's float size.
"""

from __future__ import annotations

import re

from .model import ModelSpec

GPU_FLOAT = 2  # bytes of the float dtype a GPU load holds float tensors in (bfloat16)
# storage type -> the column multiple the Triton kernels take it at (kernels/gpu/formats.py, checked by a test)
TRITON_COLS = {"Q8_0": 32, "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256,
               "BF16": 2}
_FLOAT32 = re.compile(r"(exp_probs_b|indexer\.proj)\.")  # kept float32 by the loader
_FLOAT = re.compile(r"(attn_k_b|attn_v_b|attn_kv_b|ffn_gate_inp)\.")  # read as float tensors (g(), not linear)


def gpu_bytes(name: str, dims: list[int], qtype: str, stored: int) -> int:
    """Bytes a GPU home holds of GGUF tensor `name` (dims in ggml order, `stored` bytes as the file has them)."""
    n = 1
    for d in dims:
        n *= d
    if "_exps." in name:
        return stored
    if _FLOAT32.search(name):
        return n * 4
    if len(dims) == 1 or _FLOAT.search(name):
        return n * GPU_FLOAT
    unit = TRITON_COLS.get(qtype)
    return stored if unit and dims[0] % unit == 0 else n * GPU_FLOAT


def cpu_bytes(name: str, dims: list[int], qtype: str, stored: int, heads: bool = True) -> tuple[int, int]:
    """(bytes, float elements) a CPU home holds of GGUF tensor `name` (see the module docstring); heads: the
    layer's attn_k_b and attn_v_b are both quantised, so the per-head blocks are kept (not for float parts)."""
    n = 1
    for d in dims:
        n *= d
    if "_exps." in name:
        return stored, 0
    if _FLOAT32.search(name):
        return n * 4, 0
    if re.search(r"(attn_k_b|attn_v_b|attn_kv_b)\.", name):
        return (stored if heads else 0), n  # the per-head blocks beside the float W_UK / W_UV
    if len(dims) == 1 or _FLOAT.search(name) or qtype in ("F32", "F16", "BF16"):
        return 0, n  # (a float matrix: read in the load dtype, not kept as the file has it)
    return stored, 0


def cpu_group_bytes(s: ModelSpec, layer: int, cls: str, params: int, stored: float) -> tuple[float, float]:
    """cpu_bytes for a tensor group from its parameter count (no file)."""
    if cls == "attention":
        bpw = stored / params if params else 0.0
        proj = s.hidden * s.index_heads if s.index_heads and layer in s.indexer_layers else 0
        return stored + proj * (4 - bpw), kv_b_params(s)
    if cls == "norms":
        return 0.0, params
    if cls == "router":
        bias = s.n_experts if s.router_bias else 0
        return bias * 4, params - bias
    return stored, 0.0


def kv_b_params(s: ModelSpec) -> int:
    """MLA's kv_b (W_UK and W_UV) of one layer."""
    return s.kv_lora_rank * s.n_heads * (s.qk_nope + s.v_head) if s.attention == "mla" else 0


def gpu_group_bytes(s: ModelSpec, layer: int, cls: str, params: int, stored: float) -> float:
    """A tensor group's bytes on a GPU home from its parameter count (no file: a catalog model, a config, a
    checkpoint), where `stored` is what its storage type gives."""
    if cls == "attention":
        bpw = stored / params if params else 0.0
        proj = s.hidden * s.index_heads if s.index_heads and layer in s.indexer_layers else 0
        return stored + kv_b_params(s) * (GPU_FLOAT - bpw) + proj * (4 - bpw)
    if cls == "norms":
        return params * GPU_FLOAT
    if cls == "router":
        bias = s.n_experts if s.router_bias else 0
        return (params - bias) * GPU_FLOAT + bias * 4
    return stored
