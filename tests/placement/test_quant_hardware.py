"""Quant sizes (the type table's); hardware parsing, profiles and their errors."""

import json

import gguf
import pytest

from offload.errors import ConfigError, PlacementError
from offload.gguf.types import BLOCK_FORMATS
from offload.placement import hardware as H
from offload.placement import quant as Q

from tests.placement.helpers import rig


def test_block_sizes_are_the_type_table():
    """Every ggml type's bytes per weight is offload.gguf.types' (checked against gguf-py in tests/gguf);
    the planner adds only non-ggml storage (FP8)."""
    ggml = {f.name: f for f in BLOCK_FORMATS.values()}
    assert set(Q.QUANT_BLOCKS) - set(ggml) == {"FP8"}
    for name, f in ggml.items():
        assert Q.QUANT_BLOCKS[name] == (f.block_size, f.type_size), name
        assert Q.bytes_per_weight(name) == f.bytes_per_weight, name
        assert Q.tensor_bytes(3 * f.block_size, name.lower()) == 3 * f.type_size, name
    for name in ("Q4_K", "Q8_0", "Q6_K", "IQ4_XS"):  # and so gguf-py's
        assert Q.QUANT_BLOCKS[name] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]


def test_named_sizes():
    assert Q.bytes_per_weight("q4_k") == 144 / 256
    assert Q.bytes_per_weight("Q4_K_M") == 144 / 256
    assert Q.bytes_per_weight("fp8") == pytest.approx(1 + 4 / 128**2)
    assert Q.tensor_bytes(256 * 10, "IQ1_S") == 500
    with pytest.raises(ConfigError, match="unknown quant type"):
        Q.normalize("q4_z")
    with pytest.raises(ConfigError, match="tensor class"):
        Q.default_scheme({"attn": "q4_k"})


@pytest.mark.parametrize("text,value", [("24GiB", 24 * 2**30), ("24GB", 24e9), ("80G", 80 * 2**30),
                                        ("512", 512 * 2**30), ("1.5TiB", 1.5 * 2**40)])
def test_parse_size(text, value):
    assert H.parse_size(text) == int(value)


def test_parse_bandwidth_and_errors():
    assert H.parse_bandwidth("300GB/s") == 300e9
    assert H.parse_bandwidth("1.2TB/s") == 1.2e12
    assert H.parse_bandwidth("55") == 55e9
    with pytest.raises(ConfigError, match="--dram-bw"):
        H.parse_bandwidth("fast", "--dram-bw")
    with pytest.raises(PlacementError, match="positive"):
        H.parse_size("0GiB", "--gpu")
    with pytest.raises(ConfigError, match="size like"):
        H.parse_size("-5GiB", "--gpu")
    with pytest.raises(PlacementError, match="GPU budget must be positive"):
        rig(gpus=(0,))
    with pytest.raises(PlacementError, match="RAM"):
        rig(ram=0)


def test_hardware_profile_round_trip(tmp_path):
    hw = rig(gpus=(24, 48))
    path = H.save_profile(hw, tmp_path / "hw.json")
    back = H.load_profile(path)
    assert back == hw
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ConfigError, match="not an offload hardware profile"):
        H.load_profile(tmp_path / "bad.json")


def test_detect_and_measure():
    hw = H.detect()
    assert hw.ram_bytes > 0 and hw.cpu_cores > 0 and hw.gpus == []
    assert H.measure_dram_bw(n_bytes=32 << 20, threads=2, repeats=1) > 1e8  # more than 100 MB/s
