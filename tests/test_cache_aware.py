"""Cache-aware routing (`--cache-aware-routing LAMBDA`): off changes nothing; on, every router call chooses the top-k
of logits + LAMBDA * (resident in a slot) and keeps the router's own weights for what it chose."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeshard.cli import main
from moeshard.offload_core import load_model
from moeshard.offload_core.cache_aware import RULES, SoftmaxTopK, hooks_of, verify_rule
from moeshard.offload_core.config import SettingError
from moeshard.offload_core.demo import demo_model_path

from .families import family_config, make_family_checkpoint

DEMO = demo_model_path()
SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2", "deepseek_v3")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family (or family:variant) -> a tiny random checkpoint written by save_pretrained, built on first use."""
    made = {}

    def get(name: str):
        if name not in made:
            family, _, variant = name.partition(":")
            overrides = {"norm_topk_prob": False} if variant == "no-norm" else {}
            made[name] = make_family_checkpoint(tmp_path_factory.mktemp(name.replace(":", "-")), family, **overrides)
        return made[name]

    return get


def _prompts(vocab: int = 100) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(3, vocab, (2, 6))  # a batch of two: every row gets the same bonus


def _generate(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                          pad_token_id=0)


# -- independent reference: float64, written from the families' definitions ---------------------------------------

def _expected(family: str, router, logits: torch.Tensor, bonus: torch.Tensor, chosen: torch.Tensor):
    """(selection score [T, E] whose top-k the chosen experts must be, with masked-out experts at -inf; the router's
    own weights [T, K] for `chosen`), in float64, from the unbiased logits [T, E] and the bonus [E]."""
    x = logits.double()
    if family == "deepseek_v3":
        score = (x + bonus).sigmoid() + router.e_score_correction_bias.double()
        score = _groups(score, router, lambda g: g.topk(2, dim=-1).values.sum(-1))
        w = x.sigmoid().gather(-1, chosen)
        if router.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return score, w * router.routed_scaling_factor
    probs = torch.softmax(x, dim=-1)
    score = torch.softmax(x + bonus, dim=-1)
    if family == "deepseek_v2":
        if router.topk_method == "group_limited_greedy":
            score = _groups(score, router, lambda g: g.max(-1).values)
        return score, probs.gather(-1, chosen) * router.routed_scaling_factor
    if family == "gpt_oss":
        return score, torch.softmax(x.gather(-1, chosen), dim=-1)
    w = probs.gather(-1, chosen)
    if family == "mixtral" or router.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return score, w


def _groups(score, router, group_score):
    T, E, G = score.shape[0], score.shape[1], router.num_group
    best = group_score(score.view(T, G, E // G)).topk(router.topk_group, dim=-1).indices  # [T, topk_group]
    keep = torch.zeros(T, G, dtype=torch.bool).scatter(1, best, True).repeat_interleave(E // G, dim=1)
    return score.masked_fill(~keep, float("-inf"))


def _record(om, family: str, bonus: float):
    """Hooks registered after moeshard's: each sees the routing moeshard returned and the residency it was made
    with; returns the list they append (layer, logits, weights, indices, resident) to."""
    calls = []
    for layer in om.layout.sparse_layers:
        def hook(module, args, output, layer=layer):
            resident = om.runtime.local.slots[layer].resident()
            calls.append((layer, module, output[0].detach(), output[1].detach(), output[2].detach(), resident))

        om.layout.router(om.model, layer).register_forward_hook(hook)
    return calls


def _check_calls(calls, family: str, bonus: float, exact_sets: bool) -> int:
    """Every call: chosen = a top-k of the biased selection score, weights = the router's own. Returns how many rows
    the bonus changed (against the unbiased choice)."""
    changed = 0
    for layer, router, logits, weights, chosen, resident in calls:
        E, K = logits.shape[-1], chosen.shape[-1]
        mask = torch.zeros(E, dtype=torch.float64)
        mask[resident] = bonus
        score, want = _expected(family, router, logits.cpu(), mask, chosen.cpu())
        top = score.topk(K, dim=-1)
        got = score.gather(-1, chosen.cpu())
        assert torch.isfinite(got).all(), f"layer {layer}: an expert outside the allowed groups was chosen"
        torch.testing.assert_close(got.sort(-1).values, top.values.sort(-1).values, rtol=1e-6, atol=1e-9,
                                   msg=f"layer {layer}: not a top-k of logits + bonus * resident")
        if exact_sets:
            assert torch.equal(chosen.cpu().sort(-1).values, top.indices.sort(-1).values), f"layer {layer}"
        torch.testing.assert_close(weights.double().cpu(), want, rtol=1e-5, atol=1e-6,
                                   msg=f"layer {layer}: weights are not the router's own")
        unbiased, _ = _expected(family, router, logits.cpu(), torch.zeros(E, dtype=torch.float64), chosen.cpu())
        plain = unbiased.topk(K, dim=-1).indices.sort(-1).values
        changed += int((plain != chosen.cpu().sort(-1).values).any(-1).sum())
    return changed


# -- off: nothing installed, the model's own routing ---------------------------------------------------------------

@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_off_installs_no_hook_and_keeps_transformers_greedy_tokens(checkpoints, family):
    path = checkpoints(family)
    om = load_model(path, slots_per_layer=2, prefetch=1)  # cache_aware_routing defaults to 0
    assert om.config.cache_aware_routing == 0.0
    assert hooks_of(om.model) == []
    assert all(not om.layout.router(om.model, layer)._forward_hooks for layer in om.layout.sparse_layers)
    ids = _prompts()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert torch.equal(_generate(om, ids, 12), _generate(ref, ids, 12))
    om.close()


def test_on_with_every_expert_resident_changes_nothing(checkpoints):
    """k = E, slots filled: every expert gets the same bonus, so the choice is the model's own (the hook leaves
    it alone)."""
    path = checkpoints("mixtral")
    om = load_model(path, slots_per_layer=8, prefetch=0, cache_aware_routing=5.0)
    om.runtime.local.warm()
    assert all(len(om.runtime.local.slots[layer].resident()) == 8 for layer in om.layout.sparse_layers)
    assert len(hooks_of(om.model)) == len(om.layout.sparse_layers)
    ids = _prompts()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert torch.equal(_generate(om, ids, 12), _generate(ref, ids, 12))
    om.close()


# -- on: the choice and the weights, against an independent computation -----------------------------------------

@pytest.mark.parametrize("name", [*SUPPORTED, "qwen3_moe:no-norm"])
def test_on_chooses_top_k_of_biased_logits_with_the_routers_weights(checkpoints, name):
    family = name.partition(":")[0]
    bonus = 4.0  # the tiny routers are decisive (logits ~ N(0, 8)): a large bonus so that choices do change
    om = load_model(checkpoints(name), slots_per_layer=2, prefetch=1, cache_aware_routing=bonus)
    assert len(hooks_of(om.model)) == len(om.layout.sparse_layers)
    calls = _record(om, family, bonus)
    _generate(om, _prompts(), 8)
    assert calls
    assert _check_calls(calls, family, bonus, exact_sets=True) > 0, "the bonus never changed a choice"
    om.close()


def test_on_demo_model_bf16():
    bonus = 1.0
    om = load_model(DEMO, slots_per_layer=2, prefetch=1, cache_aware_routing=bonus)
    calls = _record(om, "mixtral", bonus)
    tok = AutoTokenizer.from_pretrained(DEMO)
    rows = [tok(text)["input_ids"] for text in ("def fibonacci(n):", "import os, sys\nclass A:")]
    ids = torch.tensor([row[:min(map(len, rows))] for row in rows])  # a batch of two, same length: no padding
    om.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    # bf16 logits can tie: the chosen set must be *a* top-k of the biased logits, not a particular one of equals.
    assert _check_calls(calls, "mixtral", bonus, exact_sets=False) > 0
    om.close()


def test_predictions_see_the_bonus(checkpoints):
    """The next-layer predictor calls the same (hooked) router: its calls are among those checked above, and it
    predicts the biased routing."""
    om = load_model(checkpoints("mixtral"), slots_per_layer=2, prefetch=2, cache_aware_routing=4.0)
    calls = _record(om, "mixtral", 4.0)
    _generate(om, _prompts(), 4)
    per_layer = {layer: sum(1 for c in calls if c[0] == layer) for layer in om.layout.sparse_layers}
    first, *rest = om.layout.sparse_layers
    assert all(per_layer[layer] > per_layer[first] for layer in rest)  # routing calls + prediction calls
    _check_calls(calls, "mixtral", 4.0, exact_sets=True)
    om.close()


def test_large_bonus_raises_the_demo_models_hit_rate():
    tok = AutoTokenizer.from_pretrained(DEMO)
    ids = tok("def fibonacci(n):", return_tensors="pt")["input_ids"]
    rates = {}
    for bonus in (0.0, 8.0):
        om = load_model(DEMO, slots_per_layer=2, prefetch=1, cache_aware_routing=bonus)
        om.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        rates[bonus] = om.stats().total.hit_rate
        om.close()
    assert rates[8.0] >= rates[0.0] + 0.2, rates


# -- refusals ---------------------------------------------------------------------------------------------------

def test_phimoe_is_refused_with_a_clear_message(checkpoints):
    path = checkpoints("phimoe")
    with pytest.raises(SettingError) as info:
        load_model(path, slots_per_layer=2, cache_aware_routing=1.0)
    assert info.value.setting == "cache_aware_routing"
    message = str(info.value)
    assert "phimoe" in message and "mixtral" in message and "qwen3_moe" in message
    load_model(path, slots_per_layer=2).close()  # routing off: it runs


def test_a_rule_that_does_not_match_the_router_is_refused():
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    torch.manual_seed(0)
    router = MixtralTopKRouter(family_config("mixtral"))
    torch.nn.init.normal_(router.weight)
    verify_rule("mixtral", RULES["mixtral"], router, torch.float32)  # the real rule passes
    with pytest.raises(SettingError, match="does not route as.*weights differ"):
        verify_rule("mixtral", _Halved(always_renormalize=True, cast_back=False), router, torch.float32)
    with pytest.raises(SettingError, match="does not route as.*AttributeError"):  # Qwen's rule reads norm_topk_prob
        verify_rule("mixtral", RULES["qwen3_moe"], router, torch.float32)


class _Halved(SoftmaxTopK):
    def weigh(self, router, logits, indices):
        return super().weigh(router, logits, indices) * 0.5


# -- end to end ------------------------------------------------------------------------------------------------

def test_cli_generate_with_cache_aware_routing(capsys):
    code = main(["generate", "--prompt", "def fibonacci(n):", "--cache-aware-routing", "1.0", "--slots-per-layer", "2",
                 "--max-new-tokens", "16", "--json", "--quiet", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert 0 < len(result["token_ids"]) <= 16 and result["text"]
    assert 0 <= result["stats"]["hit_rate"] <= 1


def test_benchmark_prints_the_table_side_by_side(capsys):
    from moeshard.benchmarks.cache_aware import main as bench

    assert bench(["--lambdas", "1", "--ppl-tokens", "24", "--window", "13", "--prompt-tokens", "8",
                  "--decode-tokens", "4", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["lambda"]: row for row in result["rows"]}
    assert set(rows) == {0.0, 1.0} and result["ppl_tokens"] == 24
    assert rows[0.0]["speedup"] == 1.0 and rows[0.0]["ppl_change"] == 0.0
    for row in rows.values():
        assert row["ppl_perplexity"] > 1 and row["tok_s"] > 0 and 0 <= row["ppl_hit_rate"] <= 1
