"""offload makes torch's OpenMP threads sleep between ops (OMP_WAIT_POLICY=PASSIVE) only when it is imported before
torch; a CPU load after torch came first says so, once, with the fix."""

import subprocess
import sys

import pytest

CODE = """
import warnings
{first}
import offload
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    offload.load({path!r}, device="cpu", progress=False)
print("SPIN-WARNINGS", sum("OMP_WAIT_POLICY" in str(x.message) for x in w))
"""


@pytest.mark.parametrize("first, env, expected", [("import torch", {}, 1), ("", {}, 0),
                                                  ("import torch", {"OMP_WAIT_POLICY": "PASSIVE"}, 0)])
def test_torch_imported_first_warns_on_a_cpu_load(tiny_checkpoint, first, env, expected):
    import os

    path = tiny_checkpoint("qwen3_moe")
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-P", "-c", CODE.format(first=first, path=str(path))], capture_output=True,
                       text=True, timeout=120, env={**base, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"SPIN-WARNINGS {expected}" in r.stdout, r.stdout + r.stderr[-2000:]
