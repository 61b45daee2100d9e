"""Every eviction policy, every slot count and prefetch depth, on the trained demo model's real routing:
tokens equal transformers' greedy (the router policy once crashed here while passing on a random model)."""
import json

import pytest
import torch

from moeshard.cli import main
from moeshard.offload_core import load_model
from moeshard.offload_core.config import DEFAULT_POLICY, POLICIES
from moeshard.offload_core.demo import demo_model_path

from .conftest import demo_greedy

DEMO = demo_model_path()
PROMPT = "def fibonacci(n):"
NEW = 32


@pytest.fixture(scope="module")
def demo_reference():
    return demo_greedy(PROMPT, NEW)


@pytest.mark.slow
@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_k_and_prefetch_on_the_demo_model(demo_reference, policy):
    ids, expected, experts = demo_reference
    for k in range(1, experts + 1):
        for m in (0, 1, 2):
            with load_model(DEMO, slots_per_layer=k, prefetch=m, policy=policy, dtype="float32") as om:
                tokens = om.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                     min_new_tokens=NEW, do_sample=False)
                assert torch.equal(tokens, expected), (policy, k, m)
                total = om.stats().total
                assert total.hits + total.misses > 0
                if policy == "none":
                    assert total.hits == 0, (k, m)  # the naive baseline reuses nothing
                if m == 0:
                    assert total.predicted == 0 and total.prefetch_issued == 0
                else:
                    assert total.predicted > 0


@pytest.mark.parametrize("policy", [p if p == DEFAULT_POLICY else pytest.param(p, marks=pytest.mark.slow)
                                    for p in POLICIES])  # the default in the fast subset, every one in the suite
@pytest.mark.parametrize("k, m", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)])
def test_cli_generate_with_each_policy_on_the_demo_model(demo_reference, capsys, policy, k, m):
    """`moe-coordinator generate --policy router --slots-per-layer 2 --prefetch 1` crashed with an IndexError
    (a prefetch-driven eviction before the policy's first call): every policy now runs through the CLI."""
    ids, expected, _ = demo_reference
    code = main(["generate", "--policy", policy, "--slots-per-layer", str(k), "--prefetch", str(m), "--prompt",
                 PROMPT, "--max-new-tokens", str(NEW), "--dtype", "float32", "--device", "cpu", "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["token_ids"] == expected[0, ids.shape[1]:].tolist()
    assert result["stats"]["experts"]["total"]["prefetch_issued"] > 0
