"""A CUDA graph holds its inputs' addresses, not the tensors: whatever a recorded decode step reads that the
recording did not make itself must stay allocated while the recording lives, or a replay reads and writes freed
memory (that another tensor may hold by then). On the CPU the emulation (offload.graphs.Emulated) keeps every
tensor it recorded alive, which would hide such a bug; here its program is dropped first, leaving only what the
step itself and the model keep, and then a longer forward regrows the scratch buffers (offload.models.workspace)."""

import gc

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from offload.graphs import DecodeStep, Emulated, capture_blocker
from offload.models import workspace
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


def test_the_scratch_buffers_a_recording_reads_outlive_their_regrowth(tiny_checkpoint):
    """glm_moe_dsa: its indexer's and sparse attention's scratch buffers are read by the recorded step; a
    longer prompt afterwards asks for bigger ones."""
    model = build(tiny_checkpoint("glm_moe_dsa"))
    for moe in model.moe_layers():
        for g in moe.groups:
            g.sync_free = True
    assert capture_blocker(model) is None, capture_blocker(model)
    cache = model.new_cache(64)
    model.forward(torch.tensor(PROMPT), cache)
    step = DecodeStep(model, cache)
    step.set_inputs(NEXT[:1], [cache.length])
    step.run()  # the warm-up a CUDA recording starts with: the scratch buffers grow to the step's sizes here
    step.record()
    recording = step.recording
    assert isinstance(recording, Emulated)
    outside = outside_inputs(recording.program)
    read = {t.untyped_storage().data_ptr() for t in workspace.held()} & set(outside)
    assert read  # the indexer's keys and scores, the gathered rows
    recording.program.clear()  # what a CUDA graph keeps of them: their addresses only
    del recording

    longer = model.new_cache(256)
    model.forward(torch.arange(3, 203) % model.args.vocab_size, longer)  # regrows the scratch buffers
    gc.collect()
    assert read - {t.untyped_storage().data_ptr() for t in workspace.held()}  # they did regrow
    freed = [p for p, ref in outside.items() if ref.expired()]
    assert freed == [], f"{len(freed)} of {len(outside)} inputs of the recorded step were freed"
