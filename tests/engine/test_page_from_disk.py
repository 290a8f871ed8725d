"""--page-from-disk where the plan finds RAM too small: the CPU expert groups stay views of the GGUF's memory map in
the file's own layout (no interleaved copy), so the kernel reads evictable file pages, not anonymous RAM; the logits
are the interleaved load's but for the layouts' float order; what cannot page is named in a warning."""

import warnings

import numpy as np
import pytest
import torch

import offload
from offload.held_bytes import held_bytes
from offload.kernels.cpu import native
from tests.gguf.fixtures_models import gguf_models  # noqa: F401  (session fixture)

IDS = list(range(1, 25))


def _expert_file_bytes(llm) -> int:
    return sum(t.nbytes for name, t in llm.model.gguf.tensors.items() if "_exps." in name)


@pytest.fixture(scope="module")
def loads(gguf_models):  # noqa: F811
    if not native.has_vnni():
        pytest.skip("no VNNI: the native kernels keep the file's layout anyway (nothing is interleaved)")
    path = gguf_models.path("glm_moe_dsa", "Q4_K_M")
    paged = offload.load(path, device="cpu", ram="8256MiB", page_from_disk=True, progress=False)
    normal = offload.load(path, device="cpu", progress=False)
    return paged, normal


def test_the_plan_pages_only_where_ram_is_too_small(loads):
    paged, normal = loads
    assert paged.plan["status"] == "does_not_fit_ram" and any("from disk" in n for n in paged.plan["notes"])
    assert normal.plan["status"] != "does_not_fit_ram"
    # a model that fits keeps the interleaved copies: none of its experts are the file's pages
    assert held_bytes(normal.model).mapped.get("cpu", 0) < _expert_file_bytes(normal) / 10


def test_paged_experts_and_tables_are_views_of_the_mmap(loads):
    paged, _ = loads
    held = held_bytes(paged.model)
    experts = _expert_file_bytes(paged)
    mapped_experts = sum(n for path, home, cls, n, mapped in held.parts if mapped and cls == "routed_experts")
    assert mapped_experts == experts  # every expert byte of the file is a view of its pages
    # and nothing else of the class is big: what is not mapped are the groups' id tables (a few hundred bytes)
    assert held.by_home["cpu"]["routed_experts"] - mapped_experts < experts / 1000
    embed = paged.model.embed  # a tied head: the same table
    file = np.frombuffer(paged.model.gguf._shards[0].mm, np.uint8)
    assert embed.qtype == embed.ggml_type and np.shares_memory(embed.blocks, file)  # the file's layout, its pages
    assert held.mapped["cpu"] >= experts + embed.blocks.nbytes
    for layer in paged.model.layers:
        for g in getattr(layer.mlp, "groups", []):
            assert not any(q & native.R16 for q in g.experts.qtypes)  # the file's layout


def test_paged_logits_equal_the_interleaved_load(loads):
    paged, normal = loads
    a, b = paged.logits(IDS), normal.logits(IDS)  # (T, V)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    # The layouts sum the products in other float orders (tests/kernels/cpu/test_native.py); where a value sits
    # on a rounding boundary of the next matrix's 8-bit activations one quantum flips and that position moves
    # (measured on this fixture: 1 position of 39 by 2.6e-3 of the largest logit, the others <= 1e-7 of it)
    scale = float(b.abs().max())
    off = ((a - b).abs() > 1e-5 * scale).any(-1)  # (T,) positions beyond float-order error
    assert int(off.sum()) <= 3 and float((a - b).abs().max()) <= 1e-2 * scale


def test_what_cannot_page_is_named(loads, rng=np.random.default_rng(0)):
    """IQ4_NL experts are computed as Q8_0 (a copy: as_native): the load names them, with their bytes, and the
    group still works; a file of native types pages every expert and names nothing."""
    from offload.gguf.load import unpageable_experts
    from offload.gguf.reader import TensorInfo
    from offload.gguf.types import GGMLType
    from offload.kernels.cpu.experts import from_file_blocks
    from tests.kernels.cpu.blocks import sane_blocks

    assert unpageable_experts(loads[0].model.gguf.tensors) == ""  # Q4_K_M: Q4_K / Q5_K / Q6_K experts
    nl = GGMLType.IQ4_NL
    tensors = {"blk.1.ffn_down_exps.weight": TensorInfo("blk.1.ffn_down_exps.weight", (1408, 4096, 16), nl, 0, 0,
                                                        3 << 20),
               "blk.1.ffn_up_exps.weight": TensorInfo("blk.1.ffn_up_exps.weight", (4096, 1408, 16), GGMLType.IQ4_XS,
                                                      0, 0, 3 << 20),
               "blk.1.attn_q.weight": TensorInfo("blk.1.attn_q.weight", (1408, 1408), nl, 0, 0, 1 << 20)}
    assert unpageable_experts(tensors) == "3.0 MiB of IQ4_NL experts"
    E, H, I = 4, 64, 32
    gate, up, down = (sane_blocks(int(nl), I, H, rng, (E,)), sane_blocks(int(nl), I, H, rng, (E,)),
                      sane_blocks(int(nl), H, I, rng, (E,)))
    g = from_file_blocks(gate, up, down, (nl, nl, nl), list(range(E)), views=True)
    assert g.experts.qtypes == (int(GGMLType.Q8_0),) * 3


@pytest.mark.parametrize("held", [[1, 3], [0], [0, 1, 2, 3]])
def test_a_split_layer_pages_its_share(held):
    """A home holding some of a layer's experts (the rest on a GPU) keeps the whole file tensor as a view and
    computes only its own: equal to a group over a gathered copy of them, in the same layout."""
    from offload.gguf.types import GGMLType
    from offload.kernels.cpu.experts import CpuExpertGroup, from_file_blocks
    from offload.kernels.cpu.moe import CpuExperts
    from tests.kernels.cpu.blocks import sane_blocks

    rng = np.random.default_rng()
    E, H, I, T, K = 4, 256, 256, 5, 2
    q4, q6 = int(GGMLType.Q4_K), int(GGMLType.Q6_K)
    gate, up, down = (sane_blocks(q4, I, H, rng, (E,)), sane_blocks(q4, I, H, rng, (E,)),
                      sane_blocks(q6, H, I, rng, (E,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native types: views, no warning
        g = from_file_blocks(gate, up, down, (q4, q4, q6), held, views=True)
    assert np.shares_memory(g.experts.gate, gate) and g.ids == held
    assert g.nbytes == sum(m[held].nbytes for m in (gate, up, down))
    ref = CpuExpertGroup(CpuExperts(gate[held], up[held], down[held], (q4, q4, q6), held))
    x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32))
    ids = torch.from_numpy(rng.integers(0, E, (T, K)))
    wts = torch.from_numpy(rng.random((T, K)).astype(np.float32))
    assert torch.equal(g.submit(x, ids, wts, background=False).wait(), ref.submit(x, ids, wts, background=False).wait())


def test_a_split_model_pages_both_homes(loads, gguf_models):  # noqa: F811
    """Odd experts on one home, even on the other, both paged (as a GPU plan's CPU share is): the groups are
    masked views of the same file tensors, and the logits are the unsplit paged load's but for float order."""
    from offload.gguf.names import hf_config
    from offload.gguf.reader import GGUFFile
    from offload.gguf.source import GGUFSource
    from offload.models import architecture
    from offload.models.loading import LoadContext

    paged, _ = loads
    gguf = GGUFFile(gguf_models.path("glm_moe_dsa", "Q4_K_M"))
    config = hf_config(gguf.metadata, gguf.tensors, "fixture")
    arch = architecture(config["model_type"])
    ctx = LoadContext(GGUFSource(gguf), torch.device("cpu"), torch.float32, paged=True,
                      placement=lambda layer, n: ["cpu" if e % 2 else "gpu" for e in range(n)],
                      home_devices={"gpu": torch.device("cpu")})
    model = arch.build(ctx, arch.ModelArgs.from_config(config))
    model.gguf = gguf
    groups = [g for layer in model.layers for g in getattr(layer.mlp, "groups", [])]
    assert groups and all(g.ids == list(range(len(g.ids) * 2))[g.ids[0]::2] for g in groups)
    assert held_bytes(model).mapped["cpu"] >= _expert_file_bytes(paged)  # no gathered copies
    cache = model.new_cache(64)
    a = model.forward(torch.tensor(IDS), cache).float()  # (T, V)
    b = paged.logits(IDS)
    scale = float(b.abs().max())
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert int(((a - b).abs() > 1e-5 * scale).any(-1).sum()) <= 3 and float((a - b).abs().max()) <= 1e-2 * scale
