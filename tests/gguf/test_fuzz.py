"""Fuzz the reader: valid files written by gguf-py's GGUFWriter, then truncated, overwritten with
random bytes, or given forged huge counts / lengths / dims / offsets / type ids. Each must either
parse or raise GGUFError — never another exception, never a slow parse, never a large allocation.

Then fuzz `offload.load` on tiny complete models (tests/gguf/tiny_gguf.py) whose metadata sizes are forged
or randomly edited: each must load or raise one OffloadError, and no load may allocate from a forged size."""

import json
import random
import re
import struct
import subprocess
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType as V, GGUFWriter
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import offload
from offload.errors import GGUFError, OffloadError
from offload.gguf.reader import GGUFFile
from offload.gguf.testing import random_blocks
from offload.gguf.types import block_format

from tests.commands import python_command
from tests.gguf.tiny_gguf import METADATA, TOKENS, model_metadata_span, set_u32, write_tiny_model

_TMP = Path(tempfile.mkdtemp(prefix="offload-fuzz-"))
_TYPES = ["F32", "F16", "Q8_0", "Q4_K", "Q6_K", "IQ2_XXS", "IQ4_NL"]
_HUGE = [2**32 - 1, 2**32, 2**40, 2**48, 2**62, 2**63, 2**63 + 1, 2**64 - 1]
_MAX_ALLOC = 32 << 20  # bytes; base files are a few KB, so anything near this is length-driven
# deadline: a hang guard (a parse is bounded by the file size), far above the ~10 ms a parse takes

_keys = st.text("abcdefgh._", min_size=1, max_size=12)
_scalars = st.one_of(
    st.tuples(st.integers(0, 255), st.just(V.UINT8)),
    st.tuples(st.integers(-(2**31), 2**31 - 1), st.just(V.INT32)),
    st.tuples(st.integers(0, 2**64 - 1), st.just(V.UINT64)),
    st.tuples(st.floats(width=32, allow_nan=False), st.just(V.FLOAT32)),
    st.tuples(st.booleans(), st.just(V.BOOL)),
    st.tuples(st.text(max_size=20), st.just(V.STRING)),
)
_arrays = st.one_of(
    st.tuples(st.lists(st.integers(-100, 100), min_size=1, max_size=30), st.just(V.ARRAY), st.just(V.INT32)),
    st.tuples(st.lists(st.text(max_size=8), min_size=1, max_size=30), st.just(V.ARRAY)),
    st.tuples(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=10), st.just(V.ARRAY),
              st.just(V.FLOAT32)),
)


@st.composite
def gguf_files(draw) -> tuple[bytes, int]:
    """A valid GGUF file's bytes and where its tensor data starts."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    path = _TMP / "base.gguf"
    w = GGUFWriter(path, draw(st.sampled_from(["llama", "qwen3moe", "deepseek2", "glm4moe"])))
    for key, val in draw(st.dictionaries(_keys, st.one_of(_scalars, _arrays), max_size=6)).items():
        w.add_key_value("x." + key, *val)
    for i in range(draw(st.integers(0, 4))):
        tname = draw(st.sampled_from(_TYPES))
        fmt = block_format(tname)
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 2)) * (fmt.block_size if fmt.block_size > 1 else 8))
        raw = random_blocks(tname, shape[0] * shape[1] // fmt.block_size, rng).reshape(shape[0], -1)
        w.add_tensor(f"blk.{i}.w", raw, raw_dtype=GGMLQuantizationType[tname])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = GGUFReader(path)  # the independent reader tells where the tensor infos end
    data_start = min((t.data_offset for t in ref.tensors), default=path.stat().st_size)
    return path.read_bytes(), data_start


@st.composite
def mutated_files(draw) -> bytes:
    blob, data_start = draw(gguf_files())
    buf = bytearray(blob)
    kind = draw(st.sampled_from(["truncate", "bytes", "u64", "u32", "counts"]))
    if kind == "truncate":
        cut = draw(st.one_of(st.integers(24, data_start), st.integers(1, len(buf) - 1)))
        return bytes(buf[:min(cut, len(buf) - 1)])
    if kind == "bytes":  # random bytes into header, metadata and tensor infos (mostly past the magic)
        lo = draw(st.sampled_from([0, 24, 24, 24]))
        for _ in range(draw(st.integers(1, 8))):
            buf[draw(st.integers(lo, data_start - 1))] = draw(st.integers(0, 255))
        return bytes(buf)
    if kind == "counts":
        field = draw(st.sampled_from([8, 16]))  # tensor count, metadata count
        struct.pack_into("<Q", buf, field, draw(st.sampled_from(_HUGE + [0, 1, 5, 1000])))
        return bytes(buf)
    if kind == "u64":
        # small u64s in the header are the lengths, counts, dims and offsets: forge one of them
        spots = [p for p in range(4, data_start - 8) if 0 < struct.unpack_from("<Q", buf, p)[0] < 1 << 20]
        pos = draw(st.sampled_from(spots)) if spots else 8
        value = draw(st.one_of(st.sampled_from(_HUGE), st.integers(0, 2**64 - 1)))
        struct.pack_into("<Q", buf, pos, value)
        return bytes(buf)
    # u32: value types, element types, n_dims, ggml type ids, version
    pos = draw(st.integers(draw(st.sampled_from([4, 24, 24])), max(24, data_start - 4)))
    struct.pack_into("<I", buf, pos, draw(st.sampled_from([0, 1, 5, 9, 13, 31, 99, 2**31, 2**32 - 1])))
    return bytes(buf[:max(len(blob), pos + 4)])


def _parse(path: Path) -> GGUFFile | None:
    try:
        f = GGUFFile(path)
    except GGUFError as exc:
        assert str(exc) and "\n" not in str(exc)
        event("GGUFError: " + str(exc).split(": ", 1)[-1].split(" ")[0])
        return None
    event("parsed")
    for name, t in f.tensors.items():
        assert f.raw(name).nbytes == t.nbytes
    return f


def _dequantize_all(f: GGUFFile) -> None:
    for name, t in f.tensors.items():
        if t.nbytes <= 1 << 16:
            try:
                with np.errstate(all="ignore"):  # forged scales may be NaN: that is data, not an error
                    f.dequantize(name)
            except GGUFError:
                pass  # a type that has no dequantiser


@settings(max_examples=500, deadline=10_000, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(blob=mutated_files())
def test_mutated_files_parse_or_raise_gguf_error(blob):
    path = _TMP / "mutated.gguf"
    path.write_bytes(blob)
    tracemalloc.start()
    try:
        f = _parse(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < _MAX_ALLOC, f"parse allocated {peak} bytes for a {len(blob)}-byte file"
    if f is not None:
        _dequantize_all(f)


@settings(max_examples=30, deadline=10_000, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=gguf_files())
def test_valid_files_parse(base):
    blob, _ = base
    path = _TMP / "valid.gguf"
    path.write_bytes(blob)
    f, ref = GGUFFile(path), GGUFReader(path)
    assert [t.name for t in ref.tensors] == list(f.tensors)
    for t in ref.tensors:
        assert f.raw(t.name).tobytes() == t.data.tobytes()
    assert set(f.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}


# -- offload.load on mutated models: metadata dims checked against the tensors before anything is allocated --

# (arch, metadata key, forged value, what the error names: a regex; None: the file still loads)
_FLIPS = [
    ("qwen3moe", "attention.key_length", 2**31, r"q_proj\.weight \(GGUF blk\.0\.attn_q\.weight\) has shape "
                                                 r"\[16, 16\], expected \[4294967296, 16\]"),
    ("qwen3moe", "attention.key_length", 2**28, r"q_proj\.weight .* expected \[536870912, 16\]"),
    ("qwen3moe", "attention.key_length", 7, "7 rotary dims per head"),
    ("qwen3moe", "attention.head_count", 2**31, r"q_proj\.weight .* expected \[17179869184, 16\]"),
    ("qwen3moe", "attention.head_count", 0, r"'qwen3moe\.attention\.head_count' = 0"),
    ("qwen3moe", "attention.head_count_kv", 2, r"k_proj\.weight .* expected \[16, 16\]"),
    ("qwen3moe", "attention.head_count_kv", 2**31, "not a multiple of num_key_value_heads"),
    ("qwen3moe", "expert_count", 2**31, r"mlp\.gate\.weight .* expected \[2147483648, 16\]"),
    ("qwen3moe", "expert_count", 1, "num_experts_per_tok = 2 is more than the 1 experts"),
    ("qwen3moe", "expert_used_count", 2**31, "num_experts_per_tok = 2147483648"),
    ("qwen3moe", "expert_feed_forward_length", 2**31, r"blk\.0\.ffn_gate_exps\.weight .* expected \[4, 2147483648"),
    ("qwen3moe", "embedding_length", 2**31, r"q_proj\.weight .* expected \[16, 2147483648\]"),
    ("qwen3moe", "vocab_size", 2**31, r"vocab_size = 2147483648, but token_embd\.weight has 16 rows"),
    ("qwen3moe", "block_count", 2**31, r"block_count = 2147483648 .* 27 tensors the file holds"),
    ("qwen3moe", "block_count", 3, r"blk\.2\.attn_q\.weight\) missing"),
    ("qwen3moe", "context_length", 2**31, None),  # nothing is allocated from it
    ("deepseek2", "attention.key_length_mla", 2**31, r"blk\.0\.attn_k_b\.weight has shape \[2, 8, 4\]"),
    ("deepseek2", "attention.value_length_mla", 2**28, r"blk\.0\.attn_v_b\.weight has shape \[2, 4, 8\]"),
    ("deepseek2", "attention.kv_lora_rank", 2**31, r"blk\.0\.attn_k_b\.weight .* expected \[2, 2147483648, 4\]"),
    ("deepseek2", "attention.q_lora_rank", 2**31, r"q_a_proj\.weight .* expected \[2147483648, 16\]"),
    ("deepseek2", "rope.dimension_count", 2**31, "key_length_mla = 8 is less than deepseek2.rope.dimension_count"),
    ("deepseek2", "rope.dimension_count", 3, "3 rotary dims per head"),
    ("deepseek2", "expert_shared_count", 2**31, r"shared_experts\.gate_proj\.weight .* expected \[17179869184"),
    ("deepseek2", "leading_dense_block_count", 2**31, r"blk\.1\.ffn_gate\.weight\) missing"),
    ("deepseek2", "expert_group_count", 3, "4 experts in n_group = 3 groups"),
    ("deepseek2", "rope.scaling.original_context_length", 0, r"original_context_length' = 0"),
    ("glm-dsa", "attention.indexer.key_length", 2**31, r"indexer\.wq_b\.weight .* expected \[4294967296, 8\]"),
    ("glm-dsa", "attention.indexer.head_count", 2**28, r"indexer\.wq_b\.weight .* expected \[2147483648, 8\]"),
    ("glm-dsa", "attention.indexer.top_k", 2**31, None),  # top-k is capped by the tokens seen
]
_BOUND = 200 << 20  # bytes a load of a 25 KB model may grow the process by, however its metadata lies
# loads each file given after the first (a valid one, loaded first to warm up imports and kernels) and prints
# each outcome and the growth of peak RSS; placement="cpu" skips the planner, which refuses some forged sizes
# on its own: the loader must be bounded by itself
_PROBE = """
import json, resource, sys
import offload
from offload.errors import OffloadError
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
offload.load(sys.argv[1], device="cpu", progress=False, placement="cpu")
base, out = peak(), []
for path in sys.argv[2:]:
    try:
        offload.load(path, device="cpu", progress=False, placement="cpu")
        out.append("ok")
    except OffloadError as exc:
        out.append("OffloadError: " + str(exc))
    except BaseException as exc:
        out.append(f"raw {type(exc).__name__}: {exc}")
print(json.dumps({"outcomes": out, "grew": peak() - base}))
"""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("tiny-gguf")
    return {arch: write_tiny_model(root / f"{arch}.gguf", arch).read_bytes() for arch in METADATA}


@pytest.mark.parametrize("arch, key, value, names", _FLIPS, ids=[f"{a}-{k}-{v}" for a, k, v, _ in _FLIPS])
def test_forged_dimension_is_one_error(arch, key, value, names, tiny_models, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(set_u32(tiny_models[arch], f"{arch}.{key}", value))
    if names is None:
        offload.load(path, device="cpu", progress=False)
        return
    with pytest.raises(OffloadError) as info:
        offload.load(path, device="cpu", progress=False)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert re.search(names, message), message


def test_tokenizer_past_the_embedding_is_one_error(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", tokens=TOKENS + ["xyz"])
    with pytest.raises(GGUFError, match=r"m\.gguf: tokenizer\.ggml\.tokens lists 17 tokens, but token_embd\.weight "
                                        "has only 16 rows"):
        offload.load(path, device="cpu", progress=False)


_FORGED_U32 = [0, 1, 3, 7, 2**16, 2**28, 2**31, 2**32 - 1]


def _metadata_mutations(blob: bytes, rng: random.Random, n: int) -> list[bytes]:
    """n copies of a model with random bytes, or a random u32, written into its model metadata (the tokenizer's
    keys are left out: a merge naming an unknown token escapes gguf_tokenizer as the tokenizers library's
    plain Exception, a known gap outside the loader)."""
    lo, hi = model_metadata_span(blob)
    out = []
    for _ in range(n):
        buf = bytearray(blob)
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(lo, hi)] = rng.randrange(256)
        else:
            value = rng.choice(_FORGED_U32 + [rng.getrandbits(32)])
            struct.pack_into("<I", buf, rng.randrange(lo, hi - 4), value)
        out.append(bytes(buf))
    return out


def test_load_of_forged_metadata_stays_bounded(tiny_models, tmp_path):
    """Every forged size above and 60 random metadata edits, in a fresh process: each one loads or raises an
    OffloadError, and none grows peak memory past _BOUND (before the checks: 4.4 GiB at key_length 2^31)."""
    files, rng = [], random.Random(0)
    for i, (arch, key, value, _) in enumerate(_FLIPS):
        files.append(tmp_path / f"flip{i}.gguf")
        files[-1].write_bytes(set_u32(tiny_models[arch], f"{arch}.{key}", value))
    for arch, blob in tiny_models.items():
        for i, mutated in enumerate(_metadata_mutations(blob, rng, 20)):
            files.append(tmp_path / f"{arch}-{i}.gguf")
            files[-1].write_bytes(mutated)
    valid = tmp_path / "valid.gguf"
    valid.write_bytes(tiny_models["qwen3moe"])
    proc = subprocess.run([*python_command(), "-c", _PROBE, str(valid), *map(str, files)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    raw = [(f.name, o) for f, o in zip(files, result["outcomes"]) if not o.startswith(("ok", "OffloadError"))]
    assert not raw
    assert result["grew"] < _BOUND, f"loading forged files grew peak memory by {result['grew'] >> 20} MiB"


@settings(max_examples=150, deadline=10_000, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(sorted(METADATA)), data=st.data())
def test_random_metadata_loads_or_raises_offload_error(arch, data, tiny_models):
    blob = tiny_models[arch]
    lo, hi = model_metadata_span(blob)
    mode = data.draw(st.sampled_from(["bytes", "u32", "value"]), "mode")
    value = data.draw(st.sampled_from(_FORGED_U32) | st.integers(0, 2**32 - 1), "u32")
    if mode == "value":  # one size or count of the model set to any u32
        keys = [k for k, v in METADATA[arch].items() if isinstance(v, int)]
        blob = set_u32(blob, f"{arch}.{data.draw(st.sampled_from(keys), 'key')}", value)
    elif mode == "u32":  # anywhere: lengths, value types, counts
        buf = bytearray(blob)
        struct.pack_into("<I", buf, data.draw(st.integers(lo, hi - 4), "position"), value)
        blob = bytes(buf)
    else:
        buf = bytearray(blob)
        for pos, byte in data.draw(st.lists(st.tuples(st.integers(lo, hi - 1), st.integers(0, 255)), min_size=1,
                                            max_size=4), "(position, byte)s"):
            buf[pos] = byte
        blob = bytes(buf)
    path = _TMP / "mutated-model.gguf"
    path.write_bytes(blob)
    try:
        offload.load(path, device="cpu", progress=False)
        event("loaded")
    except OffloadError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
        event(type(exc).__name__)


def test_merges_of_unknown_tokens_are_one_clear_error():
    """The tokenizers library raises a bare Exception for a merge whose parts are not tokens."""
    from offload.errors import ConfigError
    from offload.gguf_tokenizer import tokenizer_from_gguf_metadata

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["x y"], "tokenizer.ggml.eos_token_id": 0}
    with pytest.raises(ConfigError, match="tokenizer.ggml.merges"):
        tokenizer_from_gguf_metadata(meta)
