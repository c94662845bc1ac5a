"""Training throughput of a ~0.5B model on one GPU: tokens/s, MFU and peak memory, full fine-tuning and LoRA.

The model has Qwen2.5-0.5B's shape (its config.json values, written out below so no download is
needed) with random weights; random token rows of `--seq-len` tokens, bf16 compute. Each step is the
launcher's own: engines.build (ddp: fp32 master weights, bf16 autocast, fused AdamW) and
train.train_step (the loop's normalisation, clipping and collectives), so the figures are what a
run logs. One configuration per process (benchmarks/gpu.sh gives each its own timeout).

    python benchmarks/gpu_throughput.py --config full --out results.jsonl --summary summary.md
    python benchmarks/gpu_throughput.py --dry-run --config full   # CPU, a scaled-down model: checks the script only

Prints and appends one JSON line per figure: {"figure", "value", "unit", "config", ...}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Qwen/Qwen2.5-0.5B config.json (494M parameters, 136M of them the tied embedding).
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
TINY = dict(QWEN25_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)


def attention(requested: str, cuda: bool) -> str:
    """`auto`: flash attention where its package is installed (and CUDA is there), else sdpa."""
    if requested != "auto":
        return requested
    from launcher.plan import FLASH_ATTENTION

    for name in ("flash_attention_3", "flash_attention_2"):
        try:
            distribution(FLASH_ATTENTION[name])
        except PackageNotFoundError:
            continue
        if cuda:
            return name
    return "sdpa"


def _recipe(config: str, args):
    from launcher.recipe import load_recipe

    overrides = ["strategy.backend=ddp", "model.dtype=bfloat16", "train.lr=1e-5", "train.max_grad_norm=1.0",
                 f"train.micro_batch_size={args.micro_batch}", "lora.enabled=" + str(config == "lora").lower(),
                 "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "lora.target_modules=[all-linear]"]
    return load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml", overrides)


def measure(config: str, args) -> dict:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from launcher import engines
    from launcher.dist import Dist
    from launcher.flops import MFU
    from launcher.model import add_lora
    from launcher.train import train_step

    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    attn = attention(args.attn, cuda)
    recipe = _recipe(config, args)
    torch.manual_seed(0)
    shape = TINY if args.dry_run else QWEN25_05B
    model_cfg = Qwen2Config(**shape, use_cache=False)
    dist = Dist(device=device)
    with device:
        model = AutoModelForCausalLM.from_config(model_cfg, dtype=engines.load_dtype(recipe, device), attn_implementation=attn)
    if recipe.lora.enabled:
        model = add_lora(model, recipe.lora)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = engines.build(recipe, model, dist, accumulation=1)
    mfu = MFU(engine.unwrapped(), device)
    seq, micro = args.seq_len, args.micro_batch
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (micro, seq), generator=gen)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    losses = []
    for _ in range(args.warmup):
        losses.append(train_step(engine, [batch], dist, recipe.train.max_grad_norm)["loss"])
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    tick = time.perf_counter()
    for _ in range(args.steps):
        losses.append(train_step(engine, [batch], dist, recipe.train.max_grad_norm)["loss"])
    sync()
    seconds = (time.perf_counter() - tick) / args.steps
    tokens = micro * seq
    params = sum(p.numel() for p in engine.unwrapped().parameters())
    trainable = sum(p.numel() for p in engine.unwrapped().parameters() if p.requires_grad)
    utilisation = mfu(tokens, micro, seconds, 1)
    return {
        "config": config,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "attn_implementation": attn,
        "params": params,
        "trainable": trainable,
        "seq_len": seq,
        "micro_batch": micro,
        "gradient_checkpointing": args.gradient_checkpointing,
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        # The launcher's convention (flops.py: 6N + attention); LoRA skips the frozen weights'
        # gradient matmuls (~2N of the 6N), so its MFU by this count overstates the work done.
        "mfu": utilisation,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "torch": torch.__version__,
        "dry_run": args.dry_run,
    }


UNITS = {"tokens_per_s": "tokens/s", "mfu": "fraction of bf16 peak", "peak_mem_gib": "GiB", "step_s": "s"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", choices=["full", "lora"], default=["full"], help="one per process on a GPU (clean peak memory)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--attn", default="auto", help="auto (flash attention if installed, else sdpa) or a transformers name")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="CPU, a scaled-down model, few steps: checks that the script runs")
    parser.add_argument("--out", help="append the JSON lines here")
    parser.add_argument("--summary", help="append a markdown table row here")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.seq_len, args.micro_batch, args.warmup, args.steps = min(args.seq_len, 32), min(args.micro_batch, 2), 1, 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    finite = True
    for config in args.config:
        try:
            result = measure(config, args)
        except torch.cuda.OutOfMemoryError:
            if args.micro_batch == 1:
                raise
            result = None
        if result is None:  # outside the handler, so the failed attempt's tensors are freed first
            # A smaller GPU than an H200 (an 80 GB H100): half the rows rather than no figure.
            args.micro_batch //= 2
            gc.collect()
            torch.cuda.empty_cache()
            print(f"out of memory: retrying {config} with micro batch {args.micro_batch}", file=sys.stderr, flush=True)
            result = measure(config, args)
        report(result, args)
        finite = finite and all(x == x and abs(x) < float("inf") for x in (result["loss_first"], result["loss_last"]))
    if not finite:
        print("error: the loss is not finite", file=sys.stderr)
        return 1
    return 0


def report(result: dict, args) -> None:
    context = {k: result[k] for k in ("config", "device", "attn_implementation", "seq_len", "micro_batch", "params", "trainable", "torch", "dry_run")}
    lines = [json.dumps({"figure": f, "value": result[f], "unit": u, **context}) for f, u in UNITS.items()]
    for line in lines:
        print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    if args.summary:
        mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
        mem = f"{result['peak_mem_gib']:.1f}" if result["peak_mem_gib"] is not None else "n/a"
        row = (f"| {result['config']} | {result['device']} | {result['attn_implementation']} | {result['params'] / 1e6:.1f}M "
               f"({result['trainable'] / 1e6:.1f}M trained) | {result['seq_len']} x {result['micro_batch']} | "
               f"{result['tokens_per_s']:,.0f} | {mfu} | {mem} | {result['loss_first']:.3f} -> {result['loss_last']:.3f} |")
        with open(args.summary, "a") as f:
            f.write(row + "\n")


if __name__ == "__main__":
    sys.exit(main())
