"""The MoE layer with expert placement built in.

Router (fp32 for sigmoid routers) -> top-k ids and weights -> (token, expert) pairs grouped by the
expert's home -> each group computed where its experts live -> summed, plus the shared experts.
The math does not depend on the placement: only the order of the final additions changes.

T tokens, K top-k, E routed experts, H hidden, I expert intermediate size.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from offload.models.base import MLP


def route_softmax(x: torch.Tensor, weight: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """Qwen3-MoE: softmax over all experts, top-k, optional renormalisation."""
    logits = F.linear(x, weight)  # (T, E) in the model dtype, as transformers does
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    top_w, top_ids = torch.topk(probs, top_k, dim=-1)  # (T, K)
    if norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_ids, top_w.to(logits.dtype)


def route_sigmoid_grouped(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int,
                          n_group: int, topk_group: int, norm_topk_prob: bool, scaling: float):
    """DeepSeek-V3 / GLM `noaux_tc`: sigmoid scores, bias only for the choice, best groups kept,
    other groups masked at -inf, top-k, weights from the unbiased scores."""
    logits = F.linear(x.float(), weight.float())  # (T, E)
    scores = logits.sigmoid()
    choice = scores + bias.float()
    if topk_group < n_group:  # otherwise every group is kept: nothing to mask (GLM-4.5, GLM-5)
        choice = _keep_best_groups(choice, n_group, topk_group)
    top_ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]  # (T, K)
    top_w = scores.gather(1, top_ids)
    if norm_topk_prob:
        top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
    return top_ids, top_w * scaling


def _keep_best_groups(choice: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """choice (T, E) with the experts outside each token's topk_group best groups set to -inf."""
    t, e = choice.shape
    group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)  # (T, G)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    return choice.masked_fill(~score_mask.bool(), float("-inf"))


class TorchExperts:
    """Experts held as plain torch tensors on one device (GPU, or CPU for unquantised experts)."""

    def __init__(self, device: torch.device, experts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.device = device
        self.experts = experts  # expert id -> (gate (I, H), up (I, H), down (H, I))

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, H) on this device; ids/weights (T, K) with -1 where the pair lives elsewhere."""
        out = torch.zeros_like(x)
        for e in torch.unique(ids[ids >= 0]).tolist():
            tok, kpos = torch.where(ids == e)
            gate, up, down = self.experts[e]
            xe = x[tok]  # (n, H)
            h = F.linear(F.silu(F.linear(xe, gate)) * F.linear(xe, up), down)  # (n, H)
            out.index_add_(0, tok, (h * weights[tok, kpos, None]).to(out.dtype))
        return out


class MoE:
    """Routed experts split over homes (device groups) + shared experts.

    `groups[g]` computes the pairs whose expert has `home[e] == g`; a group is any callable
    (x, ids, weights) -> partial output on its device (TorchExperts, or a CPU kernel wrapper)."""

    def __init__(self, router: Callable, groups: list, home: torch.Tensor, shared: MLP | None):
        self.router = router
        self.groups = groups
        self.home = home  # (E,) int64 group index per routed expert, on the CPU
        self.shared = shared
        self.observer: Callable | None = None  # observer(layer_idx, ids (T, K)) for routing profiles
        self.layer_idx = -1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.router(x)  # (T, K), (T, K)
        if self.observer is not None:
            self.observer(self.layer_idx, ids.detach().cpu())
        if len(self.groups) == 1:  # one home for every expert (all on the CPU, or all on the GPU)
            group = self.groups[0]
            if self.shared is not None and getattr(group, "takes_shared", False) and group.device == x.device:
                return group(x, ids, weights, shared=self.shared)  # may run it in the routed experts' call
            out = group(x.to(group.device), ids.to(group.device), weights.to(group.device)).to(x.device)
            return out + self.shared(x) if self.shared is not None else out
        home = self.home.to(ids.device)[ids]  # (T, K)
        out = None
        for g, group in enumerate(self.groups):
            sel = home == g
            if not bool(sel.any()):
                continue
            dev = group.device
            ids_g = torch.where(sel, ids, torch.full_like(ids, -1)).to(dev)
            part = group(x.to(dev), ids_g, weights.to(dev)).to(x.device)
            out = part if out is None else out + part
        if out is None:
            out = torch.zeros_like(x)
        if self.shared is not None:
            out = out + self.shared(x)
        return out
