"""Compile the Triton kernels for a CUDA target without a GPU (Triton's own compiler down to cubin, ptxas included
in the wheel): what the interpreter accepts but the compiler would reject shows up here, before a GPU machine's
scarce minutes. Run it in a process that has not imported the kernels yet (`offload bench triton-gemv --compile-only`, or
tests/kernels/gpu/test_aot.py's subprocess).
"""

import os
import time

FORMATS_ALL = (8, 10, 11, 12, 13, 14, 23, 30, 1000)  # Q8_0, Q2_K..Q6_K, IQ4_XS, BF16, FP8_BLOCK


def _sig(fn, act: str, ints: tuple = (), acts: tuple = ("x_ptr",)) -> dict:
    """Pointer arguments as the loaders pass them: activations `act`, fp32 outputs, uint8 blocks, 16-bit views."""
    sig = {}
    for n in fn.arg_names:
        if n in ("FMT", "FMT_G", "FMT_U", "FMT_D", "BLOCK_N", "BLOCK_M", "IEEE"):
            sig[n] = "constexpr"
        elif n in acts:
            sig[n] = act
        elif n in ("w_ptr", "g_ptr", "u_ptr", "d_ptr"):
            sig[n] = "*u8"
        elif n in ("w16_ptr", "g16", "u16", "d16"):
            sig[n] = "*fp16"
        elif n in ints:
            sig[n] = "*i32"
        elif n.endswith(("_ptr", "aux")):
            sig[n] = "*fp32"
        else:
            sig[n] = "i32"
    return sig


def jobs(formats=FORMATS_ALL) -> list[tuple[str, object, dict, dict]]:
    """(label, kernel, signature, constexprs) for every kernel; the dense GEMV for every format in `formats`."""
    from offload.kernels.gpu import gemm, moe

    out = [(f"gemv {f}", gemm._gemv_kernel, _sig(gemm._gemv_kernel, "*bf16"), {"FMT": f, "BLOCK_N": 32})
           for f in formats]
    f0 = formats[0]
    ints = ("ids_ptr", "slot_ptr", "pairs_ptr", "bslot_ptr")
    out += [
        ("dequant", gemm._dequant_kernel, _sig(gemm._dequant_kernel, "*bf16", ("ids_ptr",), ("out_ptr",)),
         {"FMT": f0, "BLOCK_N": 32}),
        ("mm bf16", gemm._mm_kernel, _sig(gemm._mm_kernel, "*bf16"),
         {"FMT": f0, "BLOCK_M": 32, "BLOCK_N": 64, "IEEE": False}),
        ("moe gate_up gemv", moe._gate_up_gemv, _sig(moe._gate_up_gemv, "*bf16", ints),
         {"FMT_G": f0, "FMT_U": f0, "BLOCK_N": 32}),
        ("moe down gemv", moe._down_gemv, _sig(moe._down_gemv, "*bf16", ints), {"FMT_D": f0, "BLOCK_N": 32}),
        ("moe gate_up dot", moe._gate_up_dot, _sig(moe._gate_up_dot, "*bf16", ints, ("x_ptr", "h_ptr")),
         {"FMT_G": f0, "FMT_U": f0, "BLOCK_M": 16, "BLOCK_N": 64, "IEEE": False}),
        ("moe down dot", moe._down_dot, _sig(moe._down_dot, "*bf16", ints, ("h_ptr",)),
         {"FMT_D": f0, "BLOCK_M": 16, "BLOCK_N": 64, "IEEE": False}),
    ]
    return out


def compile_all(formats=FORMATS_ALL, arch: int = 90, verbose: bool = True, only: tuple = ()) -> dict[str, float]:
    """Compile every job (those whose label starts with one of `only`, when given) for sm_`arch`;
    {label: seconds}. Raises on the first kernel that does not compile."""
    os.environ["TRITON_INTERPRET"] = "0"  # before the kernel modules' @triton.jit (the package chose "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from offload.kernels.gpu import gemm

    if not isinstance(gemm._gemv_kernel, JITFunction):
        raise RuntimeError("the kernels were imported interpreted (TRITON_INTERPRET=1): compile in a new process")

    target = GPUTarget("cuda", arch, 32)
    times = {}
    for label, fn, sig, const in jobs(formats):
        if only and not label.startswith(tuple(only)):
            continue
        t0 = time.perf_counter()
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target)
        except Exception as exc:
            raise RuntimeError(f"{label} ({const}) does not compile for sm_{arch}: {exc}") from exc
        times[label] = time.perf_counter() - t0
        if verbose:
            print(f"{label:18s} {const}  sm_{arch} ok  {times[label]:.1f} s  shared memory "
                  f"{k.metadata.shared} B", flush=True)
    return times
