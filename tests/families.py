"""Tiny random checkpoints of every MoE family moeshard supports, saved by transformers' own save_pretrained.

Hidden 64, 3 or 4 layers, 8 experts (GPT-OSS and PhiMoE: 4): small enough to run in well under a second, with
routers scaled up so that routing has structure (different tokens go to different experts) like a trained
model's. Qwen3-MoE and DeepSeek get dense layers between sparse ones.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
DEEPSEEK = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
                first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
                qk_nope_head_dim=16, n_group=4, topk_group=2, num_key_value_heads=4)
DEFAULT_ROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}  # no YaRN on a 256-token toy
FAMILIES: dict[str, dict] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48, num_hidden_layers=3),
    # Layer 1 is dense (mlp_only_layers): prefetch from layer 0 must predict layer 2.
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
                      num_hidden_layers=4, mlp_only_layers=[1], norm_topk_prob=True, head_dim=16),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
                      shared_expert_intermediate_size=64, num_hidden_layers=3),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32, num_hidden_layers=3),
    "deepseek_v2": dict(**DEEPSEEK, **DEFAULT_ROPE, num_hidden_layers=4, q_lora_rank=None,
                        topk_method="group_limited_greedy"),
    "deepseek_v3": dict(**DEEPSEEK, **DEFAULT_ROPE, num_hidden_layers=4, q_lora_rank=48),
    "gpt_oss": dict(**DEFAULT_ROPE, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, head_dim=16,
                    sliding_window=8, num_hidden_layers=3,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48, num_hidden_layers=3),
}


def family_config(family: str, **overrides):
    kwargs = {**COMMON, **FAMILIES[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def make_family_checkpoint(path, family: str, seed: int = 0, **overrides):
    """A tiny random checkpoint of `family`, written by transformers' save_pretrained, fp32."""
    torch.manual_seed(seed)
    config = family_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                param.normal_(0.0, 1.0)  # decisive routers: tokens prefer different experts
            elif name.endswith("router.bias"):
                param.normal_(0.0, 0.5)
            elif "experts" in name and not name.endswith("bias"):
                param.normal_(0.0, 0.1)  # experts that matter next to the residual stream
            elif "experts" in name:
                param.normal_(0.0, 0.05)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return path


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An MXFP4 encoder for tests: w [..., R, C] (C a multiple of 32) -> (blocks [..., R, C/32, 16] uint8, two FP4
    codes a byte, low nibble first; scales [..., R, C/32] uint8, power-of-two exponents biased by 127), the
    layout GPT-OSS checkpoints ship and transformers' `convert_moe_packed_tensors` reads."""
    from transformers.integrations.mxfp4 import FP4_VALUES

    *pre, R, C = w.shape
    groups = w.reshape(*pre, R, C // 32, 32).float()
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    codes = (groups / torch.exp2(exponent)).unsqueeze(-1).sub(torch.tensor(FP4_VALUES)).abs().argmin(-1)
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8), (exponent.squeeze(-1) + 127).to(torch.uint8)


def make_mxfp4_gpt_oss(path, seed: int = 0):
    """A GPT-OSS checkpoint whose experts are stored as MXFP4 blocks and scales, as OpenAI ships gpt-oss."""
    import json
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        make_family_checkpoint(tmp, "gpt_oss", seed=seed)
        state = load_file(f"{tmp}/model.safetensors")
        config = json.loads(Path(tmp, "config.json").read_text())
    out = {}
    for name, tensor in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # The model holds [E, in, out]; MXFP4 rows are output features, blocks run along the input.
            out[f"{name}_blocks"], out[f"{name}_scales"] = to_mxfp4(tensor.transpose(1, 2).contiguous())
        else:
            out[name] = tensor
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    return path
