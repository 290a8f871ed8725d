"""GGUFFile vs gguf-py's GGUFReader on files written by gguf-py's GGUFWriter, and the validation errors."""

import struct

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType as V
from gguf import quants as gq
from tests.gguf.gguf_forge import gguf_bytes, kv_str, kv_u32, s, tensor_info, write_model

from offload.errors import GGUFError
from offload.gguf.reader import GGUFFile, shard_paths
from offload.gguf.types import GGMLType

METADATA = {
    "test.u8": (200, V.UINT8), "test.i8": (-5, V.INT8), "test.u16": (65000, V.UINT16),
    "test.i16": (-3000, V.INT16), "test.i32": (-123456, V.INT32), "test.f32": (0.25, V.FLOAT32),
    "test.bool": (True, V.BOOL), "test.u64": (2**40 + 3, V.UINT64), "test.i64": (-(2**40), V.INT64),
    "test.f64": (1e-300, V.FLOAT64), "test.str": ("héllo ✓", V.STRING),
    "tokenizer.ggml.tokens": (["a", "Ġb", "", "<|im_end|>"] * 50, V.ARRAY),
    "tokenizer.ggml.token_type": ([1, 3, 1, 6] * 50, V.ARRAY, V.INT32),
    "tokenizer.ggml.scores": ([0.5, -1.0] * 100, V.ARRAY, V.FLOAT32),
    "test.bools": ([True, False, True], V.ARRAY),
    "test.nested": ([[1, 2], [3]], V.ARRAY),
}
TENSORS = {
    "token_embd.weight": ("F16", (16, 64)),
    "output_norm.weight": ("F32", (64,)),
    "blk.0.attn_q.weight": ("Q8_0", (7, 64)),
    "blk.0.ffn_gate_inp.weight": ("F32", (4, 64)),
    "blk.0.ffn_down_exps.weight": ("Q4_K", (4, 3, 256)),  # (expert, out, in): ggml order in, out, expert
    "blk.0.ffn_up_exps.weight": ("IQ2_XXS", (4, 5, 256)),
    "blk.1.ffn_gate_exps.weight": ("Q6_K", (4, 5, 256)),
    "blk.1.attn_k.weight": ("BF16", (3, 64)),
    "blk.1.attn_v.weight": ("IQ4_NL", (3, 64)),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    written = write_model(path, TENSORS, np.random.default_rng(0), metadata=METADATA)
    return path, written


def test_metadata_matches_gguf_py(model):
    path, _ = model
    f, ref = GGUFFile(path), GGUFReader(path)
    assert f.architecture == "qwen3moe"
    assert set(f.metadata) == set(ref.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, field in ref.fields.items():
        if key.startswith("GGUF.") or key == "test.nested":
            continue
        ours, theirs = f.metadata[key], field.contents()
        if isinstance(ours, np.ndarray):
            assert ours.tolist() == theirs, key
        else:
            assert ours == theirs and type(ours) is type(theirs), key
        assert f.value_types[key] == field.types[0]
    assert isinstance(f.metadata["tokenizer.ggml.token_type"], np.ndarray)
    assert f.metadata["tokenizer.ggml.token_type"].dtype == np.int32
    assert [a.tolist() for a in f.metadata["test.nested"]] == [[1, 2], [3]]
    assert f.metadata["test.f32"] == 0.25 and f.metadata["test.u64"] == 2**40 + 3


def test_tensors_match_gguf_py(model):
    path, written = model
    f, ref = GGUFFile(path), GGUFReader(path)
    assert list(f.tensors) == [t.name for t in ref.tensors]
    for rt in ref.tensors:
        t = f.tensors[rt.name]
        assert t.shape == tuple(int(d) for d in rt.shape)
        assert t.type == rt.tensor_type and t.type_name == rt.tensor_type.name
        assert (t.offset, t.nbytes, t.n_elements, t.file_index) == (rt.data_offset, rt.n_bytes, rt.n_elements, 0)
        assert t.np_shape == TENSORS[rt.name][1]
        raw = f.raw(rt.name)
        assert raw.dtype == np.uint8 and not raw.flags.writeable and raw.flags.owndata is False
        assert raw.tobytes() == written[rt.name].tobytes()
        ours = f.dequantize(rt.name)
        theirs = gq.dequantize(rt.data, rt.tensor_type)
        assert ours.shape == theirs.shape == t.np_shape
        assert np.array_equal(ours.view(np.uint32), np.asarray(theirs, dtype=np.float32).view(np.uint32))


def test_dequantize_torch_matches_reference(model):
    import torch

    path, _ = model
    f = GGUFFile(path)
    for name in f.tensors:
        ref = f.dequantize(name)
        out = f.dequantize_torch(name)
        assert out.dtype == torch.float32 and np.array_equal(out.numpy(), ref), name
        assert torch.equal(f.dequantize_torch(name, dtype=torch.bfloat16), torch.from_numpy(ref).bfloat16())


def test_split_files(tmp_path):
    written = write_model(tmp_path / "s.gguf", TENSORS, np.random.default_rng(1), split_max_tensors=4)
    paths = sorted(tmp_path.glob("s-*.gguf"))
    assert [p.name for p in paths] == ["s-00001-of-00003.gguf", "s-00002-of-00003.gguf", "s-00003-of-00003.gguf"]
    assert shard_paths(paths[1]) == paths
    f = GGUFFile(paths[0])
    assert f.paths == paths and f.architecture == "qwen3moe"
    assert set(f.tensors) == set(TENSORS) and f.metadata["split.count"] == 3
    assert sorted({t.file_index for t in f.tensors.values()}) == [0, 1, 2]
    for name, raw in written.items():
        assert f.raw(name).tobytes() == raw.tobytes()
    paths[2].unlink()
    with pytest.raises(GGUFError, match="s-00003-of-00003.gguf: no such file"):
        GGUFFile(paths[0])


def test_raw_is_zero_copy(model):
    path, _ = model
    f = GGUFFile(path)
    a, b = f.raw("blk.0.ffn_down_exps.weight"), f.raw("blk.0.ffn_down_exps.weight")
    assert np.shares_memory(a, b)  # both view the one mmap, nothing was read into new buffers


# ---- validation: each forged file must fail with a GGUFError naming what is wrong -------------

def _one_tensor(dims=(32,), type_id=0, offset=0, data=None, kvs=(), **kw):
    nbytes = 4 * int(np.prod(dims)) if data is None else len(data)
    return gguf_bytes([kv_str("general.architecture", "llama"), *kvs],
                      [tensor_info("w", list(dims), type_id, offset)],
                      b"\x01" * nbytes if data is None else data, **kw)


def _expect(tmp_path, blob: bytes, pattern: str):
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    with pytest.raises(GGUFError, match=pattern) as exc:
        GGUFFile(p)
    assert "bad.gguf" in str(exc.value) and "\n" not in str(exc.value)


def test_forged_tensor_fields(tmp_path):
    assert GGUFFile_ok(tmp_path, _one_tensor())
    _expect(tmp_path, b"GGML" + _one_tensor()[4:], "bad magic")
    _expect(tmp_path, _one_tensor(version=1), "unsupported GGUF version 1")
    _expect(tmp_path, _one_tensor(version=4), "unsupported GGUF version 4")
    _expect(tmp_path, _one_tensor(type_id=77), "tensor 'w' has unknown ggml type id 77")
    _expect(tmp_path, _one_tensor(offset=4), "offset 4 is not aligned to 32")
    _expect(tmp_path, _one_tensor(offset=64), "runs past the end")
    _expect(tmp_path, _one_tensor(dims=(2**40, 2**40)), "runs past the end|too many elements")
    _expect(tmp_path, _one_tensor(dims=(2**63, 2**63, 2**63, 2**63)), "too many elements")
    _expect(tmp_path, _one_tensor(dims=(32, 0, 2**40, 2**40)), "zero dim")
    _expect(tmp_path, _one_tensor(dims=(48,), type_id=GGMLType.Q4_0, data=b"\0" * 64), "not a multiple of Q4_0")
    _expect(tmp_path, _one_tensor(dims=(1, 1, 1, 1, 1)), "5 dims")
    _expect(tmp_path, _one_tensor(kvs=[kv_u32("general.alignment", 24)]), "general.alignment = 24")
    _expect(tmp_path, _one_tensor(n_tensors=2**40), "claims 1099511627776 tensors")
    _expect(tmp_path, _one_tensor()[:100], "truncated")
    two = gguf_bytes([], [tensor_info("w", [8], 0, 0), tensor_info("w", [8], 0, 32)], b"\0" * 64)
    _expect(tmp_path, two, "duplicate tensor name 'w'")
    overlap = gguf_bytes([], [tensor_info("a", [16], 0, 0), tensor_info("b", [16], 0, 32)], b"\0" * 96)
    _expect(tmp_path, overlap, "overlaps tensor 'a'")
    dup_key = gguf_bytes([kv_u32("x", 1), kv_u32("x", 2)], [])
    _expect(tmp_path, dup_key, "duplicate metadata key 'x'")


def GGUFFile_ok(tmp_path, blob: bytes) -> bool:
    p = tmp_path / "ok.gguf"
    p.write_bytes(blob)
    return np.array_equal(GGUFFile(p).dequantize("w"), np.frombuffer(blob[-128:], dtype=np.float32))


def test_forged_lengths_fail_before_allocating(tmp_path):
    # an array of 2^40 uint64 (8 TiB) and a 2^62-byte string: must fail on the length check alone
    huge_array = s("a") + struct.pack("<IIQ", 9, 10, 2**40) + b"\0" * 64
    _expect(tmp_path, gguf_bytes([huge_array], []), r"'a' \(1099511627776 elements\) needs")
    huge_strings = s("a") + struct.pack("<IIQ", 9, 8, 2**40)
    _expect(tmp_path, gguf_bytes([huge_strings], []), "1099511627776 elements")
    huge_str = s("k") + struct.pack("<IQ", 8, 2**62)
    _expect(tmp_path, gguf_bytes([huge_str], []), "metadata 'k' needs 4611686018427387904 bytes")
    huge_key = struct.pack("<Q", 2**63) + b"\0" * 16
    _expect(tmp_path, gguf_bytes([huge_key], []), "metadata key #0 needs")
    _expect(tmp_path, gguf_bytes([s("k") + struct.pack("<I", 13) + b"\0" * 8], []), "unknown value type 13")
    _expect(tmp_path, gguf_bytes([s("k") + struct.pack("<IIQ", 9, 42, 1)], []), "unknown element type 42")


def test_user_errors(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        GGUFFile(tmp_path / "missing.gguf")
    with pytest.raises(GGUFError, match="is a directory"):
        GGUFFile(tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="empty file"):
        GGUFFile(tmp_path / "empty.gguf")
    p = tmp_path / "ok.gguf"
    p.write_bytes(_one_tensor())
    with pytest.raises(GGUFError, match="no tensor named 'nope'"):
        GGUFFile(p).raw("nope")
    p.write_bytes(gguf_bytes([], []))
    with pytest.raises(GGUFError, match="general.architecture"):
        GGUFFile(p).architecture


def _string_array(key: str, items: list[bytes]) -> bytes:
    return s(key) + struct.pack("<IIQ", 9, 8, len(items)) + b"".join(s(x) for x in items)


def test_string_arrays_read_in_bulk_or_checked(tmp_path):
    # the bulk path (one decode, one split) must give what one decode per string gives, and fall back
    # to the checking loop for NULs inside strings, bad UTF-8, and characters cut between two strings
    rng = np.random.default_rng(0)
    alphabet = ["a", "Ġ", "é", "✓", "😀", " ", "\n", ""]
    words = ["".join(rng.choice(alphabet, rng.integers(0, 6))) for _ in range(500)]
    p = tmp_path / "ok.gguf"
    for items in (words, ["", "", "x", ""], ["a\x00b", "c"], ["solo"]):
        p.write_bytes(gguf_bytes([_string_array("k", [w.encode() for w in items])], []))
        assert GGUFFile(p).metadata["k"] == items
    _expect(tmp_path, gguf_bytes([_string_array("k", [b"ok", b"\xff"])], []), r"'k'\[1\] is not valid UTF-8")
    _expect(tmp_path, gguf_bytes([_string_array("k", [b"a\xc3", b"\xa9b"])], []), r"'k'\[0\] is not valid UTF-8")
    arr = _string_array("k", [b"abc", b"defg"])
    _expect(tmp_path, gguf_bytes([arr], [])[:24 + len(arr) - 2], r"'k'\[1\] needs 4 bytes")
    forged = bytearray(_string_array("k", [b"abc", b"de"]))
    struct.pack_into("<Q", forged, len(forged) - 10, 2**63)  # the second string's length
    _expect(tmp_path, gguf_bytes([bytes(forged)], []), r"'k'\[1\] needs 9223372036854775808 bytes")
