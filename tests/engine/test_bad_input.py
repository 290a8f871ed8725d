"""Every wrong input gets one clear line naming what is wrong (CLI: exit code 2, no traceback)."""

import json
import os
import re
import shutil
import struct
import subprocess

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import offload
from offload.errors import ConfigError, OffloadError, RequestError, WeightsError

from tests.commands import offload_command


@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    """A fresh copy of a tiny checkpoint to break."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen3_moe"), dst)
    return dst


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path, fn):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        offload.load(tmp_path / "nope", device="cpu")


def test_unknown_model_type(broken):
    edit_config(broken, model_type="llama_moe_9000")
    with pytest.raises(ConfigError, match="unknown model_type 'llama_moe_9000'.*qwen3_moe"):
        offload.load(broken, device="cpu", progress=False)


def test_missing_config_key(broken):
    edit_config(broken, hidden_size=None)
    with pytest.raises(ConfigError, match="missing required key 'hidden_size'"):
        offload.load(broken, device="cpu", progress=False)


def test_missing_tensor(broken):
    edit_tensors(broken, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight missing"):
        offload.load(broken, device="cpu", progress=False)


def test_misshaped_tensor(broken):
    def shrink(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:10].clone()
    edit_tensors(broken, shrink)
    with pytest.raises(WeightsError, match=r"q_proj\.weight has shape \[10, 64\], expected \[64, 64\]"):
        offload.load(broken, device="cpu", progress=False)


def test_truncated_safetensors(broken):
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        offload.load(broken, device="cpu", progress=False)
    file.write_bytes(data[:5])
    with pytest.raises(WeightsError, match="truncated"):
        offload.load(broken, device="cpu", progress=False)


def read_safetensors(file) -> tuple[dict, bytes]:
    blob = file.read_bytes()
    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_safetensors(file, header, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _header_list(h, data):
    return b"[1, 2, 3]", data


def _no_dtype(h, data):
    del h["model.layers.0.self_attn.q_proj.weight"]["dtype"]
    return h, data


def _entry_string(h, data):
    h["model.layers.0.self_attn.q_proj.weight"] = "F32"
    return h, data


def _deep_nesting(h, data):
    return b"[" * 100_000, data


def _metadata_list(h, data):
    h["__metadata__"] = ["format", "pt"]
    return h, data


def _shared_offsets(h, data):  # two (32, 64) tensors: the later one points at the earlier one's bytes
    a, b = sorted(["model.layers.1.mlp.experts.0.gate_proj.weight", "model.layers.1.mlp.experts.0.up_proj.weight"],
                  key=lambda k: h[k]["data_offsets"])
    h[b]["data_offsets"] = h[a]["data_offsets"]
    return h, data


def _removed_tensor(h, data):  # the entry is gone, its bytes are still there
    del h[by_offset(h)[1]]
    return h, data


def _unknown_dtype(h, data):
    h["model.layers.0.self_attn.q_proj.weight"]["dtype"] = "Q9"
    return h, data


# the nine ways a safetensors header was found to escape as a raw exception, and the unknown dtype
@pytest.mark.parametrize("breaker, names", [
    (_header_list, "safetensors header is a JSON list, expected an object"),
    (_no_dtype, r"tensor model\.layers\.0\.self_attn\.q_proj\.weight: header entry has no 'dtype'"),
    (_entry_string, r"tensor model\.layers\.0\.self_attn\.q_proj\.weight: header entry is a str"),
    (_deep_nesting, r"corrupt safetensors header \(not JSON\)"),
    (_metadata_list, "__metadata__ must map strings to strings"),
    (_shared_offsets, r"tensor model\.layers\.1\.mlp\.experts\.0\.\w+_proj\.weight overlaps tensor "
                      r"model\.layers\.1\.mlp\.experts\.0\.\w+_proj\.weight"),
    (_removed_tensor, r"\d+ unused bytes before tensor model\.\S+"),
    (_unknown_dtype, r"tensor model\.layers\.0\.self_attn\.q_proj\.weight has unknown dtype 'Q9'"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_broken_safetensors_header(breaker, names, broken):
    file = broken / "model.safetensors"
    write_safetensors(file, *breaker(*read_safetensors(file)))
    with pytest.raises(WeightsError) as info:
        offload.load(broken, device="cpu", progress=False)
    assert str(info.value).startswith(f"{file}: ") and re.search(names, str(info.value)), str(info.value)


def write_index(path, weight_map) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_is_not_json(broken):
    (broken / "model.safetensors.index.json").write_text("{'weight_map': ")
    with pytest.raises(WeightsError, match=r"model\.safetensors\.index\.json: not a valid JSON file"):
        offload.load(broken, device="cpu", progress=False)


def test_index_has_no_weight_map(broken):
    (broken / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(WeightsError, match=r"model\.safetensors\.index\.json: expected a non-empty 'weight_map'"):
        offload.load(broken, device="cpu", progress=False)


def test_index_names_a_file_outside_the_folder(broken):
    write_index(broken, {"model.norm.weight": "model.safetensors", "x": "../../../etc/passwd"})
    with pytest.raises(WeightsError, match=r"index\.json: shard '\.\./\.\./\.\./etc/passwd' resolves to "
                                           r"/\S*etc/passwd, outside the checkpoint folder"):
        offload.load(broken, device="cpu", progress=False)


def test_shard_symlink_pointing_outside(broken, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (broken / "model.safetensors").rename(outside / "model.safetensors")
    (broken / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(WeightsError, match=r"shard 'model\.safetensors' resolves to .*elsewhere/model\.safetensors, "
                                           "outside the checkpoint folder"):
        offload.load(broken, device="cpu", progress=False)


def test_hub_cache_symlinks_into_blobs_load(broken, tmp_path):
    """Hugging Face's cache links snapshots/<rev>/<file> to ../../blobs/<hash>: that is not outside."""
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(broken.iterdir())):
        (blobs / f"blob{i}").write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blobs / f"blob{i}", snapshot))
    assert offload.load(snapshot, device="cpu", progress=False).logits([1, 2]).shape[0] == 2


@pytest.mark.parametrize("change, error, names", [
    ({"head_dim": 2**31}, WeightsError, r"q_proj\.weight has shape \[64, 64\], expected \[8589934592, 64\]"),
    ({"num_hidden_layers": 2**31}, ConfigError, r"num_hidden_layers = 2147483648, but the weights hold only"),
    ({"num_experts": 2**31}, WeightsError, r"layers\.1\.mlp\.gate\.weight has shape \[8, 64\], expected "
                                           r"\[2147483648, 64\]"),
    ({"vocab_size": 2**31}, WeightsError, r"embed_tokens\.weight has shape \[\d+, 64\], expected \[2147483648, 64\]"),
    ({"hidden_size": "64"}, ConfigError, "hidden_size = '64', expected a non-negative integer"),
    ({"num_attention_heads": 0}, ConfigError, "num_attention_heads = 0"),
    ({"num_key_value_heads": 3}, ConfigError, "not a multiple of num_key_value_heads = 3"),
    ({"num_experts_per_tok": 9}, ConfigError, "num_experts_per_tok = 9 is more than the 8 experts"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, ConfigError,
     "rope_theta = -1.0, expected a positive number"),
    ({"rope_scaling": [1, 2]}, ConfigError, "rope_scaling = \\[1, 2\\], expected a JSON object"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_config_dims_are_checked_against_the_tensors(change, error, names, broken):
    """A config.json size that disagrees with the weights is one error before anything is allocated from it."""
    edit_config(broken, **change)
    with pytest.raises(error) as info:
        offload.load(broken, device="cpu", progress=False)
    assert str(broken) in str(info.value) and re.search(names, str(info.value)), str(info.value)


def test_bad_requests(tiny_checkpoint):
    llm = offload.load(tiny_checkpoint("qwen3_moe"), device="cpu", ctx=32, progress=False)
    with pytest.raises(RequestError, match="context length 32"):
        llm.generate(list(range(30)), max_new_tokens=8)
    with pytest.raises(RequestError, match="temperature"):
        llm.generate("hi", temperature=-1)
    with pytest.raises(RequestError, match="prompt token ids"):
        llm.generate([10**9])
    assert llm.generate("hi", max_new_tokens=2).token_ids  # still serves after the errors


@pytest.mark.parametrize("make_bad", ["missing", "unknown_type"])
def test_cli_prints_one_line_and_exits_2(make_bad, broken, tmp_path):
    path = tmp_path / "nope" if make_bad == "missing" else broken
    if make_bad == "unknown_type":
        edit_config(broken, model_type="bogus")
    proc = subprocess.run([*offload_command(), "generate", str(path), "--prompt", "hi",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert issubclass(WeightsError, OffloadError)


def test_expert_quant_is_refused_for_gguf(tmp_path):
    with pytest.raises(ConfigError, match="already quantised"):
        offload.load(tmp_path / "model.gguf", expert_quant="q4_k")
