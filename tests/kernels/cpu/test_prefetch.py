"""The interleaved kernels' software prefetch distance: chosen per machine (OFFLOAD_PREFETCH_AHEAD, else what
`offload probe` saved, else 9 KB), set at run time, and never part of the arithmetic."""

import json

import numpy as np
import pytest
import torch

from offload.gguf.testing import random_blocks
from offload.gguf.types import GGMLType
from offload.kernels.cpu import native

pytestmark = pytest.mark.skipif(not native.has_vnni(), reason="the interleaved kernels need AVX-512 VNNI")


@pytest.mark.parametrize("qtype", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0])  # Q6_K, Q8_0: issue none
def test_every_distance_gives_the_same_bits(qtype):
    rng = np.random.default_rng(3)
    k, n = 2048, 112  # 7 groups of 16 rows
    per_row = k // (32 if qtype == GGMLType.Q8_0 else 256)
    w, wt = native.repack(random_blocks(int(qtype), n * per_row, rng).reshape(n, -1), int(qtype))
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    lib = native.lib()
    outs = []
    try:
        for d in (0, 64, 2304, 9216, 1 << 20):  # past the end of the matrix too: a prefetch never faults
            lib.qdot_set_prefetch(d)
            assert lib.qdot_get_prefetch() == d
            outs.append(native.gemv(x, w, wt))
    finally:
        lib.qdot_set_prefetch(native.prefetch_ahead())
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_the_distance_comes_from_env_then_probe_then_default(tmp_path, monkeypatch):
    monkeypatch.delenv("OFFLOAD_PREFETCH_AHEAD", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.prefetch_ahead() == native.DEFAULT_PREFETCH_AHEAD  # no profile
    profile = tmp_path / "offload" / "hardware.json"
    profile.parent.mkdir()
    profile.write_text(json.dumps({"calibration": {"prefetch_ahead": 2304}}))
    assert native.prefetch_ahead() == 2304
    for bad in ("[1, 2]", "{not json", json.dumps({"calibration": {"prefetch_ahead": "lots"}})):
        profile.write_text(bad)  # a damaged profile never stops the kernels: the default stands
        assert native.prefetch_ahead() == native.DEFAULT_PREFETCH_AHEAD
    monkeypatch.setenv("OFFLOAD_PREFETCH_AHEAD", "4608")
    assert native.prefetch_ahead() == 4608
    monkeypatch.setenv("OFFLOAD_PREFETCH_AHEAD", "-1")
    with pytest.raises(ValueError, match="OFFLOAD_PREFETCH_AHEAD"):
        native.prefetch_ahead()
