"""Cache-aware routing (opt-in): nudge each MoE layer's router toward the experts already in its slots.

With a bonus LAMBDA > 0 (`OffloadConfig.cache_aware_routing`, `--cache-aware-routing`), every sparse layer's
router chooses its top-k from `logits + LAMBDA * resident`, where `resident[e]` is 1 for the experts holding one
of this process's slots for that layer (`runtime.local.slots[layer].resident()`: loaded, or loading after a
prefetch) at the moment the router runs. Every row of a batch gets the same bonus. Only the SELECTION sees the
bonus: the weights of the chosen experts are the router's own, computed from the unbiased logits by the family's
own rule (softmax, renormalised over the chosen experts iff the family renormalises), as DeepSeek-V3's
correction bias affects which experts are chosen and never their weights. In both softmax and sigmoid routers a
bonus of LAMBDA multiplies a resident expert's unnormalised score (exp(logit), or the sigmoid's odds) by
e^LAMBDA for the choice.

Mechanism: a forward hook on each router module (transformers' own `...TopKRouter`, which returns
`(logits, weights, indices)`) recomputes indices and weights from the logits it returned. transformers' code
is not patched. With LAMBDA = 0 no hook is installed at all, so routing (and greedy tokens) are exactly the
model's. Before installing, each family's rule is checked against the router itself on random inputs: weights
for the router's own choices must be bit-identical, and its choices a top-k of the unbiased selection score, or
loading is refused (a transformers whose router changed is never silently mis-weighted).

Families: mixtral, qwen2_moe, qwen3_moe, olmoe (softmax top-k), gpt_oss (top-k of logits, softmax over the k),
deepseek_v2 (softmax, greedy or group-limited greedy), deepseek_v3 (sigmoid with correction bias, group-limited;
the bonus goes on the logits, before the sigmoid). Refused: phimoe, whose sparsemixer picks its second expert
with a threshold around the first and weighs each choice by a softmax over a choice-dependent mask, so "the
router's own weight" of an expert it would not have chosen is not defined; any family not listed.

Next-layer prediction (`moe_layer.next_layer_predictor`) calls the next layer's router module, so its hook
fires there too, with that layer's residency at prediction time: predictions see the bonus on purpose. They
exist to guess what the next layer WILL route, and it will route with the bonus; a prediction without it would
name experts the biased router then passes over. (The effect reinforces itself: a predicted expert starts
loading, so holds a slot, so gets the bonus when its layer routes. That is the point: fewer misses.)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .config import SettingError

# T = tokens (rows of every sequence in the batch), E = experts per layer, K = experts per token, G = groups


class Rule:
    """A family's routing rule, split in two: which experts are chosen (`select`, from logits plus a bonus per
    expert) and what weight a chosen expert gets (`weigh`, from the unbiased logits: the router's own)."""

    def select(self, router: nn.Module, logits: torch.Tensor, bonus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [T, K], the selection score [T, E] they are a top-k of) for logits [T, E] + bonus [E]."""
        raise NotImplementedError

    def weigh(self, router: nn.Module, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The router's own weights [T, K] for `indices`, from its unbiased logits (same arithmetic, same dtype)."""
        raise NotImplementedError


class SoftmaxTopK(Rule):
    """Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: softmax over all experts, top-k, renormalised over the k (Mixtral
    always, in float32; the others iff `norm_topk_prob`, cast back to the logits' dtype)."""

    def __init__(self, always_renormalize: bool, cast_back: bool):
        self.always_renormalize, self.cast_back = always_renormalize, cast_back

    def select(self, router, logits, bonus):
        score = logits.float() + bonus  # top-k of softmax(logits + bonus) = top-k of logits + bonus (monotone)
        return torch.topk(score, router.top_k, dim=-1).indices, score

    def weigh(self, router, logits, indices):
        probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
        weights = probs.gather(-1, indices)
        if self.always_renormalize or router.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype) if self.cast_back else weights


class TopKThenSoftmax(Rule):
    """GPT-OSS: top-k of the logits, weights a softmax over the k chosen logits."""

    def select(self, router, logits, bonus):
        score = logits.float() + bonus
        return torch.topk(score, router.top_k, dim=-1).indices, score

    def weigh(self, router, logits, indices):
        return torch.nn.functional.softmax(logits.gather(-1, indices), dim=1, dtype=logits.dtype)


def _group_limited(score: torch.Tensor, router: nn.Module, group_score: Callable, fill: float) -> torch.Tensor:
    """DeepSeek's group-limited choice: keep the `topk_group` best groups by `group_score`, mask the rest."""
    E, G = score.shape[-1], router.num_group
    groups = group_score(score.view(-1, G, E // G))  # [T, G]
    chosen = torch.topk(groups, k=router.topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(groups).scatter_(1, chosen, 1)
    keep = mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
    return score.masked_fill(~keep.bool(), fill)


class DeepseekV2Rule(Rule):
    """DeepSeek-V2: softmax in float32; greedy top-k or group-limited greedy (groups ranked by their best expert);
    weights the chosen probabilities times `routed_scaling_factor`, not renormalised."""

    METHODS = ("greedy", "group_limited_greedy")

    def select(self, router, logits, bonus):
        score = logits.float() + bonus  # monotone in softmax(logits + bonus), for experts and groups' maxima alike
        if router.topk_method == "group_limited_greedy":
            score = _group_limited(score, router, lambda g: g.max(dim=-1).values, float("-inf"))
        return torch.topk(score, k=router.top_k, dim=-1, sorted=False)[1], score

    def weigh(self, router, logits, indices):
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        return scores.gather(1, indices) * router.routed_scaling_factor


class DeepseekV3Rule(Rule):
    """DeepSeek-V3: sigmoid scores; the choice is made on sigmoid(logits + bonus) + its correction bias, by groups
    (a group's score: its two best experts); weights sigmoid(logits) of the chosen, renormalised iff
    `norm_topk_prob`, times `routed_scaling_factor`."""

    def select(self, router, logits, bonus):
        score = (logits.float() + bonus).sigmoid() + router.e_score_correction_bias
        score = _group_limited(score, router, lambda g: g.topk(2, dim=-1)[0].sum(dim=-1), float("-inf"))
        return torch.topk(score, k=router.top_k, dim=-1, sorted=False)[1], score

    def weigh(self, router, logits, indices):
        weights = logits.sigmoid().gather(1, indices)
        if router.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
        return weights * router.routed_scaling_factor


RULES: dict[str, Rule] = {
    "mixtral": SoftmaxTopK(always_renormalize=True, cast_back=False),
    "qwen2_moe": SoftmaxTopK(always_renormalize=False, cast_back=True),
    "qwen3_moe": SoftmaxTopK(always_renormalize=False, cast_back=True),
    "olmoe": SoftmaxTopK(always_renormalize=False, cast_back=True),
    "gpt_oss": TopKThenSoftmax(),
    "deepseek_v2": DeepseekV2Rule(),
    "deepseek_v3": DeepseekV3Rule(),
}
REFUSED = {
    "phimoe": "its sparsemixer router picks the second expert with a threshold around the first and weighs each "
              "choice by a softmax over a mask that depends on that choice, so an expert it would not have chosen "
              "has no weight of the router's own to keep",
}


def check_supported(model_type: str, router: nn.Module | None = None) -> Rule:
    """The family's rule, or a SettingError("cache_aware_routing") naming the family and what is supported."""
    supported = ", ".join(RULES)
    if model_type not in RULES:
        why = REFUSED.get(model_type, "moeshard does not know its routing rule")
        raise SettingError("cache_aware_routing",
                           f"cache-aware routing is not available for model_type {model_type!r}: {why}. Supported "
                           f"families: {supported}; run this model with a bonus of 0 (the default: routing off)")
    rule = RULES[model_type]
    if router is not None and isinstance(rule, DeepseekV2Rule) and router.topk_method not in rule.METHODS:
        raise SettingError("cache_aware_routing",
                           f"cache-aware routing is not available for {model_type} with topk_method "
                           f"{router.topk_method!r} (supported: {', '.join(rule.METHODS)})")
    return rule


def verify_rule(model_type: str, rule: Rule, router: nn.Module, dtype: torch.dtype, rows: int = 64) -> None:
    """Check `rule` against `router` itself on random inputs (no bonus): the weights it gives the router's own
    choices must be the router's, bit for bit, and the router's choices a top-k of the rule's selection score.
    A SettingError otherwise (this transformers' router does something the rule does not)."""
    param = next(router.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(rows, param.shape[-1], generator=gen).to(device=param.device, dtype=dtype)
    with torch.no_grad():
        logits, weights, indices = router(hidden)[:3]
        try:
            zero = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
            mine, score = rule.select(router, logits, zero)
            ours = rule.weigh(router, logits, indices)
            same_weights = ours.dtype == weights.dtype and torch.equal(ours, weights)
            same_choice = mine.shape == indices.shape and torch.equal(score.gather(-1, mine).sort(-1).values,
                                                                      score.gather(-1, indices).sort(-1).values)
            problem = None if same_weights and same_choice else \
                f"{'weights' if not same_weights else 'choices'} differ on a test input"
        except (AttributeError, TypeError, RuntimeError, ValueError) as exc:  # a router attribute renamed, a shape...
            problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        raise SettingError("cache_aware_routing",
                           f"cache-aware routing: this transformers' {type(router).__name__} ({model_type}) does not "
                           f"route as moeshard's rule for {model_type} expects ({problem}); refusing rather than "
                           "mis-weighting experts: run with a bonus of 0")


class RouterHook:
    """The forward hook on one sparse layer's router: re-chooses with the residency bonus, keeps its weights."""

    def __init__(self, routing: CacheAwareRouting, layer: int):
        self.routing, self.layer = routing, layer

    def __call__(self, module: nn.Module, args, output):
        logits = output[0]  # [T, E]
        bonus = self.routing.bonus_for(self.layer, logits)
        if bonus is None:  # no expert resident, or all of them: the bonus changes nothing
            return None
        rule = self.routing.rule
        indices, _ = rule.select(module, logits, bonus)
        return (logits, rule.weigh(module, logits, indices), indices, *output[3:])


class CacheAwareRouting:
    """The hooks of one model: the bonus, its family's rule, and where residency is read (the runtime's local
    experts, looked up at every call: a worker that is told a new slot count replaces its slots)."""

    def __init__(self, runtime, bonus: float, rule: Rule):
        self.runtime, self.bonus, self.rule = runtime, float(bonus), rule
        self.handles: list = []
        self._masks: dict[int, tuple[tuple, torch.Tensor]] = {}  # layer -> (key, bonus vector [E]) last built

    def resident(self, layer: int) -> list[int]:
        slots = self.runtime.local.slots.get(layer)
        return slots.resident() if slots is not None else []

    def bonus_for(self, layer: int, logits: torch.Tensor) -> torch.Tensor | None:
        """LAMBDA * resident mask [E] (float32, on the logits' device), or None when it cannot change a choice."""
        E = logits.shape[-1]
        resident = sorted(self.resident(layer))
        if not resident or len(resident) >= E:
            return None
        key = (tuple(resident), logits.device, torch.is_inference_mode_enabled())
        held = self._masks.get(layer)
        if held is not None and held[0] == key:
            return held[1]
        mask = torch.zeros(E, dtype=torch.float32, device=logits.device)
        mask[torch.tensor(resident, device=logits.device)] = self.bonus
        self._masks[layer] = (key, mask)
        return mask

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def install(model: nn.Module, layout, runtime, bonus: float, dtype: torch.dtype) -> CacheAwareRouting | None:
    """Hook every sparse layer's router of `model` (None, and nothing installed, when `bonus` is 0)."""
    if not bonus:  # checked by OffloadConfig: a finite number >= 0
        return None
    first = layout.router(model, layout.sparse_layers[0])
    rule = check_supported(layout.model_type, first)
    verify_rule(layout.model_type, rule, first, dtype)
    routing = CacheAwareRouting(runtime, bonus, rule)
    for layer in layout.sparse_layers:
        router = layout.router(model, layer)
        routing.handles.append(router.register_forward_hook(RouterHook(routing, layer)))
    return routing


def hooks_of(model: nn.Module) -> list[RouterHook]:
    """The cache-aware routing hooks installed on `model`'s modules (none when the bonus is 0)."""
    return [hook for module in model.modules() for hook in module._forward_hooks.values()
            if isinstance(hook, RouterHook)]
