"""KV memory by need: a sequence cache holds whole blocks of what it has used, grows as the sequence does (up to
the context length) and gives the spare blocks back; the logits are those of a cache big enough from the start."""

import pytest
import torch

import offload
from offload.cache import BLOCK, capacity_for
from offload.errors import RequestError
from tests.engine.conftest import ARCHS


def test_capacity_grows_in_blocks_by_a_quarter_at_least():
    assert capacity_for(1, 0, 10_000) == BLOCK
    assert capacity_for(BLOCK + 1, BLOCK, 10_000) == 2 * BLOCK
    assert capacity_for(8 * BLOCK + 1, 8 * BLOCK, 100_000) == 10 * BLOCK  # a quarter more, in blocks
    assert capacity_for(900, 768, 1000) == 1000  # never past the context length


@pytest.mark.parametrize("arch", ["glm_moe_dsa", "qwen3_moe"])
def test_grown_cache_gives_the_same_logits(arch, tiny_checkpoint, monkeypatch):
    import offload.cache

    model = offload.load(tiny_checkpoint(arch), device="cpu", progress=False, ctx=64).model
    ids = torch.randint(0, model.args.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    ref = model.forward(ids, model.new_cache(64))  # one block holds all 40
    monkeypatch.setattr(offload.cache, "BLOCK", 8)  # now it grows 8 -> 16 -> 24 -> ... while decoding
    cache = model.new_cache(64)
    assert all(layer.capacity == 8 for layer in cache.layers)
    out = [model.forward(ids[:10], cache)] + [model.forward(ids[i:i + 1], cache) for i in range(10, 40)]
    assert {layer.capacity for layer in cache.layers} == {40}  # 8, 16, 24, 32, 40: whole blocks, not ctx 64
    torch.testing.assert_close(torch.cat(out), ref, rtol=0, atol=1e-5)
    allocated = cache.nbytes()
    cache.length = 12  # as resume(12) leaves it
    cache.shrink()
    assert {layer.capacity for layer in cache.layers} == {16} and cache.nbytes() < allocated
    assert cache.nbytes() == 16 * cache.position_bytes()
    # the kept positions still hold the right keys: decode on from 12 as before
    again = torch.cat([model.forward(ids[i:i + 1], cache) for i in range(12, 40)])
    torch.testing.assert_close(again, ref[12:], rtol=0, atol=1e-5)
    with pytest.raises(RequestError, match="context length 64"):
        model.forward(torch.zeros(30, dtype=torch.long), cache)
