"""The MoE layer with expert placement built in.

Router (fp32 for sigmoid routers) -> top-k ids and weights -> every expert group (one per home) computes
the pairs of the experts it holds -> summed, plus the shared experts. The math does not depend on the
placement: only the order of the final additions changes.

T tokens, K top-k, E routed experts, H hidden, I expert intermediate size.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


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


class ExpertGroupError(RuntimeError):
    """An expert group failed (on the worker thread, say); raised at the wait, naming the layer and the group."""


class MoE:
    """Routed experts split over homes (expert groups, offload.models.experts) + shared experts.

    The runtime orders a layer's work (offload.runtime): `route`, every group's submit (the background ones
    first), the shared expert while they run, then `gather` (wait for each group, sum in group order, then the
    shared expert: one order whatever ran where or when). Every group takes the router's ids as they are and
    computes the pairs of the experts it holds. `shared` is None when a group runs the shared expert inside its
    own call (decided when the groups were built)."""

    def __init__(self, router: Callable, groups: list, shared: Callable | None, layer_idx: int = -1):
        self.router = router
        self.groups = groups
        self.shared = shared
        self.observer: Callable | None = None  # observer(layer_idx, ids (T, K)) for routing profiles
        self.layer_idx = layer_idx

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, H) -> ids (T, K), weights (T, K)."""
        ids, weights = self.router(x)
        if self.observer is not None:
            self.observer(self.layer_idx, ids.detach().cpu())
        return ids, weights

    def submit(self, x: torch.Tensor) -> list:
        """x (T, H) -> one handle per group, each holding a partial (T, H), submitted in group order."""
        ids, weights = self.route(x)
        return [group.submit(x, ids, weights) for group in self.groups]

    def gather(self, handles: list, shared: torch.Tensor | None) -> torch.Tensor:
        """The sum of the groups' partials, in group order, plus the shared experts' output (T, H)."""
        out = None
        for group, h in zip(self.groups, handles):
            try:
                part = h.wait()
            except ExpertGroupError:
                raise  # named where it was raised (the runtime's hand-off)
            except Exception as exc:
                raise ExpertGroupError(f"layer {self.layer_idx}: expert group {type(group).__name__} on "
                                       f"{group.device} failed: {type(exc).__name__}: {exc}") from exc
            out = part if out is None else out + part
        return out if shared is None else out + shared
