"""Train moeshard's bundled demo model: a tiny Mixtral MoE on CPython's stdlib.

Builds a byte-level BPE tokenizer and a ~5 M parameter Mixtral (8 experts,
top-2) from the stdlib ``*.py`` sources, trains it deterministically on CPU
(10-25 minutes on 2 cores, depending on load), and saves a bf16 checkpoint
plus ``heldout.txt`` and ``training_report.json`` so tests can check quality (with offload_core.evaluate)
without the stdlib.

    python -m offload_core.demo.train --out offload_core/demo/model

``--family qwen3_moe`` trains a many-expert variant instead, in the Qwen3-MoE architecture, for
measurements that need many small experts (expert-cache policies on real routing); ``--experts``,
``--top-k`` and ``--expert-size`` size its experts (defaults: 64 experts of intermediate size 56, top-8:
the same active expert width per token as the demo's 2 x 224). Save it outside the repository:

    python -m offload_core.demo.train --family qwen3_moe --experts 64 --top-k 8 --expert-size 56 \\
        --out /work/many_expert_model --steps 320 --warmup 50 --minutes 15 --threads 1

(~1.4 s a step on one free core, 3-4 s on 2 busy shared ones: --steps 320 keeps a busy run near 15 minutes.)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    get_cosine_with_min_lr_schedule_with_warmup,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from ..evaluate import cross_entropy

logger = logging.getLogger(__name__)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Directories whose sources are tests, GUI tools, codec tables or data blobs
# rather than representative Python code.
EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "encodings", "pydoc_data",
     "turtledemo", "__phello__", "__pycache__"}
)
PROMPT = "def fibonacci(n):"
# Per family: model class and the default (experts per layer, experts per token, expert intermediate size).
FAMILIES: dict[str, tuple[type[PreTrainedModel], tuple[int, int, int]]] = {
    "mixtral": (MixtralForCausalLM, (8, 2, 224)),
    "qwen3_moe": (Qwen3MoeForCausalLM, (64, 8, 56)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: the bundled demo model's; required with another --family)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1100)
    p.add_argument("--minutes", type=float, default=25.0,
                   help="wall-clock cap on the training loop alone; stops early if exceeded")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--heldout-every", type=int, default=20,
                   help="every N-th stdlib file (sorted order) is held out")
    p.add_argument("--heldout-chars", type=int, default=64_000)
    p.add_argument("--max-file-bytes", type=int, default=200_000)
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads; use 1 on a busy machine, where 2 threads stall on each other")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--family", choices=sorted(FAMILIES), default="mixtral",
                   help="architecture: mixtral (the bundled demo) or qwen3_moe (a many-expert variant)")
    p.add_argument("--experts", type=int, default=None,
                   help="experts per MoE layer (default: mixtral 8, qwen3_moe 64)")
    p.add_argument("--top-k", type=int, default=None,
                   help="experts each token is routed to (default: mixtral 2, qwen3_moe 8)")
    p.add_argument("--expert-size", type=int, default=None,
                   help="each expert's intermediate size (default: mixtral 224, qwen3_moe 56)")
    args = p.parse_args(argv)
    if args.out is None:
        if args.family != "mixtral":  # never overwrite the bundled demo model with another architecture
            p.error(f"--family {args.family} needs --out (a folder outside the repository)")
        args.out = Path(__file__).parent / "model"
    experts, top_k, size = FAMILIES[args.family][1]
    args.experts = experts if args.experts is None else args.experts
    args.top_k = top_k if args.top_k is None else args.top_k
    args.expert_size = size if args.expert_size is None else args.expert_size
    if not 1 <= args.top_k <= args.experts or args.expert_size < 1:
        p.error(f"need 1 <= --top-k <= --experts and --expert-size >= 1, got "
                f"{args.top_k}, {args.experts}, {args.expert_size}")
    return args


def load_stdlib_sources(max_bytes: int) -> list[tuple[str, str]]:
    """(relative path, text) of every usable stdlib ``*.py`` file, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or path.stat().st_size > max_bytes:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            sources.append((rel.as_posix(), text))
    logger.info("stdlib %s: %d usable source files", root, len(sources))
    return sources


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        # Seeding all 256 bytes guarantees any text is encodable, even bytes unseen in training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def build_config(tokenizer: PreTrainedTokenizerFast, seq_len: int, family: str = "mixtral",
                 experts: int | None = None, top_k: int | None = None,
                 expert_size: int | None = None) -> PretrainedConfig:
    """The demo's shape (hidden 192, 4 layers, 6 heads); only the experts differ between variants."""
    default_experts, default_top_k, default_size = FAMILIES[family][1]
    experts = default_experts if experts is None else experts
    top_k = default_top_k if top_k is None else top_k
    expert_size = default_size if expert_size is None else expert_size
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=2 * seq_len,
        num_experts_per_tok=top_k,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "mixtral":
        return MixtralConfig(intermediate_size=expert_size, num_local_experts=experts, **common)
    # Every layer sparse (no mlp_only_layers); intermediate_size (the dense MLP's) is then unused.
    # norm_topk_prob as in the released Qwen3-MoE checkpoints.
    return Qwen3MoeConfig(moe_intermediate_size=expert_size, intermediate_size=top_k * expert_size,
                          num_experts=experts, head_dim=192 // 6, norm_topk_prob=True, **common)


def heldout_sample(texts: list[str], max_chars: int) -> str:
    """Head of every held-out file, each cut at a line end, joined within ``max_chars``.

    An equal share per file keeps the sample representative of all held-out
    files instead of being dominated by the first few in sorted order.
    """
    share = max_chars // len(texts)
    heads = [text if len(text) <= share else text[: text.rfind("\n", 0, share) + 1] for text in texts]
    return "\n".join(head for head in heads if head.strip())


def train(model: PreTrainedModel, stream: torch.Tensor, args: argparse.Namespace) -> dict:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, args.warmup, args.steps, min_lr_rate=0.1
    )
    # A dedicated generator keeps the data order a function of the seed alone.
    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seq_len)
    n_experts, top_k = model.config.num_local_experts, model.config.num_experts_per_tok
    model.train()
    start, step, recent = time.monotonic(), 0, []
    budget_s = args.minutes * 60
    while step < args.steps:
        if time.monotonic() - start > budget_s:
            logger.warning("time budget of %.1f min reached after %d steps", args.minutes, step)
            break
        starts = torch.randint(0, len(stream) - args.seq_len, (args.batch_size,), generator=gen)
        batch = stream[starts[:, None] + offsets]
        out = model(input_ids=batch, output_router_logits=True)
        lm_loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        # transformers' aux loss pools routing statistics over all layers, which lets a
        # layer starve some experts while the pooled load looks uniform; balance each layer.
        aux = torch.stack([load_balancing_loss_func((g,), n_experts, top_k) for g in out.router_logits]).mean()
        (lm_loss + model.config.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        recent = (recent + [lm_loss.item()])[-args.log_every :]
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.monotonic() - start
            logger.info(
                "step %d/%d  lm loss %.3f  per-layer aux %.3f  lr %.2e  %.0f tok/s  %.1f min",
                step, args.steps, sum(recent) / len(recent), aux.item(),
                sched.get_last_lr()[0], step * batch.numel() / elapsed, elapsed / 60,
            )
    return {
        "steps": step,
        "tokens_seen": step * args.batch_size * args.seq_len,
        "train_wall_time_s": round(time.monotonic() - start, 1),
        # Mean over the last logging window: a single batch's loss is too noisy to report.
        "train_loss_end": round(sum(recent) / len(recent), 4),
    }


@torch.no_grad()
def expert_load(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, text: str,
                seq_len: int) -> list[list[float]]:
    """Per layer, the share of top-k routing slots each expert receives on ``text``."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    usable = len(ids) // seq_len * seq_len
    out = model(input_ids=ids[:usable].view(-1, seq_len), output_router_logits=True)
    k, n = model.config.num_experts_per_tok, model.config.num_local_experts
    loads = []
    for logits in out.router_logits:
        counts = torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=n)
        loads.append([round(c, 4) for c in (counts / counts.sum()).tolist()])
    return loads


def generate_samples(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, seed: int) -> dict[str, str]:
    inputs = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(seed)
    samples = {}
    for name, kwargs in {"greedy": {"do_sample": False},
                         "sampled": {"do_sample": True, "temperature": 0.8, "top_k": 50}}.items():
        ids = model.generate(**inputs, max_new_tokens=80, pad_token_id=tokenizer.pad_token_id, **kwargs)
        samples[name] = tokenizer.decode(ids[0], skip_special_tokens=True)
        logger.info("%s sample:\n%s", name, samples[name])
    return samples


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wall_start = time.monotonic()

    sources = load_stdlib_sources(args.max_file_bytes)
    heldout = [s for i, s in enumerate(sources) if i % args.heldout_every == 0]
    train_src = [s for i, s in enumerate(sources) if i % args.heldout_every != 0]
    heldout_text = heldout_sample([text for _, text in heldout], args.heldout_chars)
    logger.info("%d training files, %d held-out files (%d chars sampled)",
                len(train_src), len(heldout), len(heldout_text))

    tokenizer = train_tokenizer([text for _, text in train_src], args.vocab_size)
    encoded = tokenizer.backend_tokenizer.encode_batch([text for _, text in train_src], add_special_tokens=False)
    # EOS between files marks document boundaries inside the flat token stream.
    stream = torch.tensor([t for enc in encoded for t in (*enc.ids, tokenizer.eos_token_id)])
    logger.info("tokenizer: %d tokens; training stream: %d tokens", len(tokenizer), len(stream))

    config = build_config(tokenizer, args.seq_len, args.family, args.experts, args.top_k, args.expert_size)
    model_class = FAMILIES[args.family][0]
    model = model_class(config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %d parameters, experts implementation %r",
                n_params, model.config._experts_implementation)

    stats = train(model, stream, args)
    model.eval()
    logger.info("held-out loss before bf16 cast: %.4f",
                cross_entropy(model, tokenizer, heldout_text, args.seq_len)["loss"])

    args.out.mkdir(parents=True, exist_ok=True)
    # Router logits are only needed for the training aux loss; inference should not pay for them.
    model.config.output_router_logits = False
    # transformers >= 5 always writes safetensors, so no safe_serialization flag is needed.
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "heldout.txt").write_text(heldout_text, encoding="utf-8")

    # Score what was actually shipped: the bf16 weights, upcast to float32 on load.
    reloaded = model_class.from_pretrained(args.out, dtype=torch.float32)
    heldout_loss = cross_entropy(reloaded, tokenizer, heldout_text, args.seq_len)["loss"]
    load = expert_load(reloaded, tokenizer, heldout_text, args.seq_len)
    logger.info("held-out expert load per layer (uniform = %.3f): %s", 1 / config.num_local_experts, load)
    samples = generate_samples(reloaded, tokenizer, args.seed)

    report = {
        "command": shlex.join(["python", "-m", "offload_core.demo.train",
                               *(sys.argv[1:] if argv is None else argv)]),
        "seed": args.seed,
        **stats,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "wall_time_s": round(time.monotonic() - wall_start, 1),
        "parameter_count": n_params,
        "heldout_loss": round(heldout_loss, 4),
        "heldout_perplexity": round(math.exp(heldout_loss), 2),
        "heldout_files": len(heldout),
        "heldout_expert_load": load,
        "heldout_chars": len(heldout_text),
        "train_files": len(train_src),
        "train_stream_tokens": len(stream),
        "corpus_python_version": sys.version,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "samples": {"prompt": PROMPT, **samples},
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    size_mb = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"done: {stats['steps']} steps in {report['wall_time_s'] / 60:.1f} min, "
          f"train loss {stats['train_loss_end']:.3f}, held-out loss {heldout_loss:.3f}, "
          f"{n_params:,} params, {size_mb:.1f} MB in {args.out}")


if __name__ == "__main__":
    main()
