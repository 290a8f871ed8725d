"""How the tests start our commands in a subprocess: the installed `offload` script, as a user runs it.

Never `python -m offload` or `python -c` from the checkout: both put the working directory (the repository root)
on sys.path, where our kernels/ and gguf/ folders shadow the installed packages of the same names."""

import shutil
import sys
import sysconfig


def offload_command() -> list[str]:
    exe = shutil.which("offload", path=sysconfig.get_path("scripts"))
    if exe is None:
        raise RuntimeError(f"no `offload` script beside {sys.executable}: install the package (pip install -e .)")
    return [exe]


def python_command() -> list[str]:
    """This interpreter with -P: the working directory stays off sys.path for `-c` code."""
    return [sys.executable, "-P"]


def wait_healthy(url: str, proc, log_path, seconds: float = 60.0) -> None:
    """Wait for `offload serve` at url to answer /health (bounded: python + torch import + load); fail with its
    log when it exits or takes longer."""
    import time

    import httpx

    for _ in range(int(seconds * 10)):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(open(log_path).read())
