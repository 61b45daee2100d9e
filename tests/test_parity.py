"""The main oracle: offloaded inference equals transformers' MixtralForCausalLM on the same folder."""
import pytest
import torch

from moeshard.offload_core import load_model

from .conftest import NUM_EXPERTS

PROMPT = torch.tensor([[1, 17, 42, 5, 88, 23, 61, 9, 30, 74]])


@pytest.fixture(scope="module", params=["tiny_ckpt", pytest.param("tiny_sharded_ckpt", marks=pytest.mark.slow)])
def ckpt_and_ref(request, reference):
    path = request.getfixturevalue(request.param)
    ref = reference(path)
    with torch.no_grad():
        logits = ref(PROMPT).logits
    tokens = ref.generate(PROMPT, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    return path, logits, tokens


@pytest.mark.parametrize("k", [1, 2, NUM_EXPERTS])
@pytest.mark.parametrize("m", [0, 1, 2])
def test_logits_and_greedy_tokens_match_transformers(ckpt_and_ref, k, m):
    path, ref_logits, ref_tokens = ckpt_and_ref
    model = load_model(path, slots_per_layer=k, prefetch=m)
    with torch.no_grad():
        logits = model(PROMPT).logits
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    tokens = model.generate(PROMPT, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert tokens.shape[1] == PROMPT.shape[1] + 32
    assert torch.equal(tokens, ref_tokens)
    total = model.stats().total
    assert total.hits + total.misses > 0
    if k == NUM_EXPERTS:  # everything stays resident: each expert is loaded at most once
        assert total.misses <= NUM_EXPERTS * 3
    if m == 0:
        assert total.prefetch_issued == 0 and total.predicted == 0
    else:
        assert total.predicted > 0
    model.close()


def test_ram_store_matches_disk_store(tiny_ckpt, reference):
    ref = reference(tiny_ckpt)
    with torch.no_grad():
        expected = ref(PROMPT).logits
    for store in ("ram", "disk"):
        model = load_model(tiny_ckpt, slots_per_layer=2, prefetch=1, store=store)
        with torch.no_grad():
            torch.testing.assert_close(model(PROMPT).logits, expected, atol=1e-5, rtol=0)
        assert model.stats().backends["local"]["store"] == store
        model.close()


def test_batched_prompts_match(tiny_ckpt, reference):
    ref = reference(tiny_ckpt)
    batch = torch.tensor([[1, 5, 9, 13, 17], [1, 60, 50, 40, 30]])
    model = load_model(tiny_ckpt, slots_per_layer=1, prefetch=2)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, ref(batch).logits, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parity(tiny_ckpt, reference):
    ref = reference(tiny_ckpt)
    expected = ref.generate(PROMPT, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    for store in ("ram", "disk"):
        model = load_model(tiny_ckpt, device="cuda", slots_per_layer=2, prefetch=2, store=store)
        with torch.no_grad():
            torch.testing.assert_close(model(PROMPT.cuda()).logits.cpu(), ref(PROMPT).logits, atol=1e-4, rtol=1e-4)
        tokens = model.generate(PROMPT.cuda(), max_new_tokens=32, do_sample=False, min_new_tokens=32)
        assert torch.equal(tokens.cpu(), expected)


@pytest.mark.parametrize("policy", ["router", "none"])
@pytest.mark.parametrize("k", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_other_eviction_policies_keep_exact_tokens(tiny_ckpt, reference, policy, k):
    expected = reference(tiny_ckpt).generate(PROMPT, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    model = load_model(tiny_ckpt, slots_per_layer=k, prefetch=1, policy=policy)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=32, do_sample=False, min_new_tokens=32), expected)
    model.close()
