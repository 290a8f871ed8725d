"""A CUDA graph holds its inputs' addresses, not the tensors: whatever a recorded decode step reads that the
recording did not make itself must stay allocated while the recording lives, or a replay reads and writes freed
memory (that another tensor may hold by then). On the CPU the emulation (offload.graphs.Emulated) keeps every
tensor it recorded alive, which would hide such a bug; here its program is dropped first, leaving only what the
step itself and the model keep, and then a longer forward regrows the scratch buffers (offload.models.workspace)."""

import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from offload.graphs import DecodeStep, Emulated, capture_blocker
from offload.models import workspace
from tests.engine.test_graph_segments import stand_in_gpu
from tests.engine.test_graph_step import NEXT, PROMPT
from tests.engine.test_homes import build


def outside_inputs(program: list) -> dict:
    """{storage address: weak reference} of the tensors the recorded ops read but no recorded op made (0-d
    tensors aside: Python numbers wrapped by torch for the op, not memory a graph reads)."""
    made, outside = set(), {}
    for entry in program:
        if not isinstance(entry, tuple):
            continue  # a host call
        _, args, kwargs, out = entry
        for a in tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor) and a.dim() > 0:
                s = a.untyped_storage()
                if s.data_ptr() not in made:
                    outside.setdefault(s.data_ptr(), StorageWeakRef(s))
        made.update(o.untyped_storage().data_ptr() for o in tree_leaves(out) if isinstance(o, torch.Tensor))
    return outside


def kept(model) -> set:
    """Addresses of the buffers kept between forwards: the scratch buffers, the runtime's staging slots."""
    staging = model.runtime.staging
    bufs = list(workspace.held()) + [b for slot in (staging.slots if staging else ()) for b in slot.bufs.values()]
    return {b.untyped_storage().data_ptr() for b in bufs}


def recorded_then_regrown(model, monkeypatch) -> tuple[DecodeStep, dict, set]:
    """Record a decode step as CUDA does (a warm-up run of the step first, then the recording), drop the
    emulation's references to the recorded ops' tensors (a CUDA graph keeps their addresses only; the host calls
    stay, as CudaSegments keeps them), run a longer prompt -> (the step, which holds its cache; the recording's
    outside inputs; the kept buffers among them that the longer prompt replaced)."""
    assert capture_blocker(model) is None, capture_blocker(model)
    monkeypatch.setattr(workspace, "_buffers", {})  # none left by other tests: the step's sizes make them
    cache = model.new_cache(64)
    model.forward(torch.tensor(PROMPT), cache)
    step = DecodeStep(model, cache)
    step.set_inputs(NEXT[:1], [cache.length])
    step.run()  # the warm-up: the scratch and staging buffers grow to the step's sizes here
    step.record()
    assert isinstance(step.recording, Emulated)
    program = step.recording.program
    outside = outside_inputs(program)
    read = kept(model) & set(outside)
    program[:] = [entry for entry in program if not isinstance(entry, tuple)]
    longer = model.new_cache(256)
    model.forward(torch.arange(3, 203) % model.args.vocab_size, longer)  # regrows the scratch / staging buffers
    gc.collect()
    return step, outside, read - kept(model)


def test_the_scratch_buffers_a_recording_reads_outlive_their_regrowth(tiny_checkpoint, monkeypatch):
    """glm_moe_dsa, every expert with its layer: the indexer's and sparse attention's scratch buffers
    (offload.models.workspace) are read by the recorded step; the longer prompt asks for bigger ones."""
    model = build(tiny_checkpoint("glm_moe_dsa"))
    for moe in model.moe_layers():
        for g in moe.groups:
            g.sync_free = True
    step, outside, replaced = recorded_then_regrown(model, monkeypatch)
    assert len(replaced) == 3  # the indexer's keys and scores, the gathered rows
    freed = [p for p, ref in outside.items() if ref.expired()]
    assert freed == [], f"{len(freed)} of {len(outside)} inputs of the recorded step were freed"


@pytest.mark.parametrize("arch", ["qwen3_moe", "glm_moe_dsa"])
def test_the_staging_buffers_of_a_segmented_recording_outlive_their_regrowth(arch, tiny_checkpoint, monkeypatch):
    """Half the experts in a CPU group (the recording cut at its calls): the host buffers the recorded segments
    copy into and out of (offload.staging) outlive a longer prompt that regrows the runtime's slots."""
    model = stand_in_gpu(tiny_checkpoint(arch))
    step, outside, replaced = recorded_then_regrown(model, monkeypatch)
    assert len(replaced) >= 4  # x, ids, weights and the partial of at least one slot
    freed = [p for p, ref in outside.items() if ref.expired()]
    assert freed == [], f"{len(freed)} of {len(outside)} inputs of the recorded step were freed"
