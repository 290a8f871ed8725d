"""The one ggml type table (offload.gguf.types) against gguf-py's, and the format side staying torch-free.

The planner's and the kernels' copies are checked to be this table in tests/placement/test_quant_hardware.py
and tests/kernels/cpu/test_dequant.py."""

import subprocess

import gguf
import numpy as np
import pytest

from offload.gguf.types import BLOCK_FORMATS, GGMLType, block_format, block_sizes

from tests.commands import python_command

_REF = {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t])  # id -> (name, block size, bytes per block)
        for t in gguf.GGMLQuantizationType if t in gguf.GGML_QUANT_SIZES}


def test_table_agrees_with_gguf_py():
    ours = {f.id: (f.name, f.block_size, f.type_size) for f in BLOCK_FORMATS.values()}
    both = ours.keys() & _REF.keys()
    assert {i: ours[i] for i in both} == {i: _REF[i] for i in both}
    # gguf-py may know newer types than we do, never the reverse (a type of ours it lacks is a typo)
    assert ours.keys() <= _REF.keys()
    assert {"Q4_K", "Q8_0", "IQ4_XS", "BF16", "MXFP4"} <= {ours[i][0] for i in both}


def test_table_is_complete_and_self_consistent():
    assert set(BLOCK_FORMATS) == {int(t) for t in GGMLType}  # every id has its block layout
    for tid, f in BLOCK_FORMATS.items():
        assert f.id == tid and f.type is GGMLType(tid) and f.name == GGMLType(tid).name
        assert f.bits_per_weight == 8 * f.bytes_per_weight == 8 * f.type_size / f.block_size
        assert block_format(f.name) is block_format(f.name.lower()) is block_format(f.type) is f
        assert block_format(tid) is f
    assert block_format("Q4_K").bits_per_weight == 4.5
    assert block_sizes(["q8_0", GGMLType.Q4_K, 14]) == {8: (32, 34), 12: (256, 144), 14: (256, 210)}
    with pytest.raises(KeyError):
        block_format("Q4_Z")
    with pytest.raises(KeyError):
        block_format(99)


def test_format_side_does_not_import_torch(tmp_path):
    """The type table, the reader (header, raw bytes, numpy dequant) and the planner's GGUF header path
    run without torch: offload.placement is pure Python + numpy."""
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(2, 32))
    raw = np.zeros((2, 34), np.uint8)
    w.add_tensor("b", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code = ("import sys\n"
            "from offload.gguf.types import block_format\n"
            "from offload.gguf.reader import GGUFFile\n"
            "from offload.placement.gguf_meta import read_header\n"
            f"g = GGUFFile({str(path)!r})\n"
            "assert g.dequantize('a').shape == (2, 32) and g.dequantize('b').shape == (2, 32)\n"
            f"meta, tensors = read_header({str(path)!r})\n"
            "assert [t[2] for t in tensors] == ['F32', 'Q8_0'], tensors\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([*python_command(), "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
