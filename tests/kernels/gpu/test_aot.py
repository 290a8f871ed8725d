"""The kernels compile for a real GPU (sm_90, Triton's compiler down to cubin, no GPU needed): the interpreter
runs what the compiler may reject, and bf16 tl.dot is only ever compiled, never run, on this machine. A subset
here: the Q4_K and FP8 GEMVs and the Q4_K tl.dot GEMM in bf16 (every kernel and format:
`offload bench triton-gemv --compile-only`); and the bench's dry run under the interpreter."""

import os
import subprocess
import sys

import pytest


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    code = ("from offload.kernels.gpu.aot import compile_all; "
            "t = compile_all(formats=(12, 1000), only=('gemv', 'mm bf16')); print(sorted(t))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "['gemv 1000', 'gemv 12', 'mm bf16']" in r.stdout, r.stdout


def test_bench_dry_run(capsys):
    from offload.kernels.gpu.bench import main

    main(["--formats", "Q4_K", "--rows", "64", "--cols", "256"])
    out = capsys.readouterr().out
    assert "Q4_K GEMV" in out and "torch.sum (baseline)" in out and "Q4_K MoE decode" in out
