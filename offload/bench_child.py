"""One measurement in a fresh process (its own peak memory, no state left by the previous one): a benchmark
module's function called by name with JSON arguments, its JSON result read back from stdout."""

import json
import subprocess
import sys


def in_child(module: str, fn: str, args: list, timeout: float) -> dict:
    """module.fn(*args) in a new `python -P` -> its result (a dict), or {"error": why} (timeout, a crash: the last
    line of its stderr)."""
    code = (f"import json, sys; from {module} import {fn}; "
            f"print('RESULT ' + json.dumps({fn}(*json.loads(sys.argv[1]))))")
    try:
        out = subprocess.run([sys.executable, "-P", "-c", code, json.dumps(args)], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:200]}
