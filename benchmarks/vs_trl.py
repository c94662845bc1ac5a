"""The same SFT work through `sft run` and through TRL's SFTTrainer, side by side, on CPU ranks.

    python benchmarks/vs_trl.py [--rows 1600] [--max-seq-len 1024] [--nproc 2] [--out DIR]

What runs (every run: the same ~10M-parameter Llama built locally from a seed, fp32, sdpa,
`--nproc` gloo ranks, one epoch, global batch 16 = micro 4 x accumulation 2 x 2 ranks, AdamW
lr 1e-3, cosine, no warmup, the same seed):
  ours packed   `sft run` with data.packing true (what unset picks on this skewed data)
  ours padded   `sft run` with data.packing false (micro-batches grouped by length within a step)
  trl padded    SFTTrainer, padding to the longest row of each micro-batch
  trl packed    SFTTrainer with packing_strategy bfd (padding-free rows of max_length tokens; TRL
                then counts packed rows, not examples, per batch, so it runs fewer, larger steps)
The data: length-skewed messages conversations (assistant replies of lognormal length, median
~120 tokens per conversation, a tail past max_seq_len, which is truncated). TRL gets the very
token ids and labels `sft run` prepared (a pre-tokenized dataset), so both train on the same tokens.

Reported per run: epoch time (the training loop: our metrics' elapsed_s at the last step, TRL's
train_runtime), trained tokens per second (the same non-padding token count for every run divided
by its epoch time), wall time of the whole command, peak RSS of its largest process (wait4), and
the final eval loss, computed here for every run's final model by the same token-exact function
(sum of target-token cross-entropies over the eval set / their count). Then the ratios.

Last, chunked vs full cross-entropy: the peak RSS of one forward+backward of a 2-layer Llama with a
128,256-token vocabulary on 2,048 tokens, each way in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MICRO, ACCUM, LR, SEED = 4, 2, 1e-3, 0
WORDS = ("the of and to in is was for on that with as by at from his it an were are which this be or has had not but "
         "first one their its new after who they have her she two been other when there all during into school time "
         "may years more most only over city some world would where later up such used many can state about national "
         "out known university united then made").split()
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
       "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}


def build_model(path: Path, vocab_size=None, hidden=320, layers=6, intermediate=864, heads=5) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from launcher.builtin import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(SEED)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_data(path: Path, rows: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
            words = max(1, int(rng.lognormvariate(math.log(30), 1.0)))
            reply = " ".join(rng.choice(WORDS) for _ in range(words))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i}: {question}?"}, {"role": "assistant", "content": reply}]}) + "\n")


def run(cmd, log: Path) -> dict:
    """Wall time and peak RSS (the largest process of the tree that was waited for) of a command."""
    tick = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV}, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed; see {log}")
    return {"wall_s": time.perf_counter() - tick, "peak_rss_gib": usage.ru_maxrss / 2**20}


def ours(root: Path, model: Path, data: Path, evals: Path, nproc: int, max_len: int, packing: bool) -> dict:
    name = f"ours-{'packed' if packing else 'padded'}"
    out = root / name
    recipe = root / f"{name}.yaml"
    recipe.write_text(
        f"name: {name}\noutput_dir: {out}\nseed: {SEED}\nmodel: {{path: {model}, dtype: float32}}\n"
        f"data: {{train_files: [{data}], eval_files: [{evals}], format: messages, max_seq_len: {max_len}, packing: {str(packing).lower()}, cache_dir: {root / 'cache'}}}\n"
        f"train: {{micro_batch_size: {MICRO}, gradient_accumulation_steps: {ACCUM}, epochs: 1, lr: {LR}, lr_scheduler: cosine}}\n"
        "checkpoint: {every_minutes: 0}\nlogging: {every_steps: 1}\n"
    )
    measured = run([sys.executable, "-m", "launcher", "run", str(recipe), "--nproc", str(nproc)], root / f"{name}.log")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    return {"name": name, "epoch_s": steps[-1]["elapsed_s"], "steps": steps[-1]["step"], "model": out / "final", **measured}


def trl(root: Path, model: Path, nproc: int, max_len: int, packing: bool) -> dict:
    name = f"trl-{'packed' if packing else 'padded'}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "--trl-worker", str(root), "--model", str(model), "--max-seq-len", str(max_len), "--name", name]
    measured = run(cmd + (["--packing"] if packing else []), root / f"{name}.log")
    result = json.loads((root / name / "result.json").read_text())
    return {"name": name, "epoch_s": result["train_runtime"], "steps": result["steps"], "model": root / name / "model", **measured}


def trl_worker(args) -> None:
    """One rank of TRL's SFTTrainer on the rows `sft run` prepared (root/tokenized.jsonl)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    root = Path(args.trl_worker)
    out = root / args.name
    cfg = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM, num_train_epochs=1,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=SEED,
        use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False, max_length=args.max_seq_len,
        packing=args.packing, packing_strategy="bfd", padding_free=False, dataset_num_proc=None,
        logging_steps=10, report_to="none", save_strategy="no", disable_tqdm=True, ddp_backend="gloo",
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
    )
    dataset = load_dataset("json", data_files=str(root / "tokenized.jsonl"), split="train", cache_dir=str(root / "hf-datasets"))
    trainer = SFTTrainer(model=args.model, args=cfg, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(args.model))
    stats = trainer.train()
    if trainer.is_world_process_zero():
        trainer.save_model(str(out / "model"))
        (out / "result.json").write_text(json.dumps({"train_runtime": stats.metrics["train_runtime"], "steps": trainer.state.global_step}))


def eval_loss(model_dir: Path, rows: list) -> float:
    """Token-exact eval loss of a saved model: summed target-token cross-entropy / target count."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.data.batches import pad_collate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            chunk = rows[i : i + 8]
            b = pad_collate([r["input_ids"] for r in chunk], [r["labels"] for r in chunk], 0)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            target = b["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / count


def ce_memory_worker(chunk: int, path: str) -> None:
    """One training step's peak RSS above the RSS before it, full (chunk 0) or chunked cross-entropy."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.train import token_loss_sum

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 2048))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    token_loss_sum(model, {k: v[:, :16] for k, v in batch.items()}, chunk).backward()  # allocator warm-up
    model.zero_grad(set_to_none=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tick = time.perf_counter()
    loss = token_loss_sum(model, batch, chunk)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"chunk": chunk, "step_peak_gib": (peak - before) / 2**20, "peak_rss_gib": peak / 2**20,
                      "seconds": time.perf_counter() - tick, "loss": float(loss) / 2047}))


def ce_memory(root: Path) -> list:
    path = build_model(root / "big-vocab", vocab_size=128256, hidden=256, layers=2, intermediate=688, heads=4)
    results = []
    for chunk in (0, 256):
        proc = subprocess.run([sys.executable, __file__, "--ce-worker", str(chunk), str(path)], cwd=REPO, env={**os.environ, **ENV},
                              capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1600)
    p.add_argument("--eval-rows", type=int, default=160)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--only", default="ours-packed,ours-padded,trl-padded,trl-packed,ce")
    p.add_argument("--trl-worker", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--ce-worker", nargs=2, default=None)
    args = p.parse_args()
    if args.trl_worker:
        return trl_worker(args)
    if args.ce_worker:
        return ce_memory_worker(int(args.ce_worker[0]), args.ce_worker[1])

    root = Path(args.out or tempfile.mkdtemp(prefix="vs-trl-"))
    root.mkdir(parents=True, exist_ok=True)
    only = args.only.split(",")
    model = build_model(root / "model")
    data, evals = root / "train.jsonl", root / "eval.jsonl"
    write_data(data, args.rows, seed=1)
    write_data(evals, args.eval_rows, seed=2)

    from launcher.data.prepare import prepare
    from launcher.model import load_tokenizer
    from launcher.recipe import DataConfig, ModelConfig

    tok = load_tokenizer(model, ModelConfig(path=str(model)))
    cfg = DataConfig(train_files=[str(data)], eval_files=[str(evals)], format="messages", max_seq_len=args.max_seq_len)
    prepared = prepare(cfg, tok, root / "cache", SEED)
    train_rows = prepared.train.select_columns(["input_ids", "labels"]).to_list()
    eval_rows = prepared.eval.select_columns(["input_ids", "labels"]).to_list()
    with open(root / "tokenized.jsonl", "w") as f:
        for r in train_rows:
            f.write(json.dumps(r) + "\n")
    lengths = sorted(len(r["input_ids"]) for r in train_rows)
    tokens = sum(lengths)
    stats = prepared.stats[0]
    print(f"data: {len(train_rows)} train rows ({stats.truncated} truncated at {args.max_seq_len}), median {lengths[len(lengths) // 2]} tokens, "
          f"p95 {lengths[int(0.95 * len(lengths))]}, max {lengths[-1]}; {tokens} tokens per epoch; {len(eval_rows)} eval rows", flush=True)

    results = []
    for name in only:
        if name.startswith("ours-"):
            results.append(ours(root, model, data, evals, args.nproc, args.max_seq_len, name == "ours-packed"))
        elif name.startswith("trl-"):
            results.append(trl(root, model, args.nproc, args.max_seq_len, name == "trl-packed"))
        else:
            continue
        r = results[-1]
        r["eval_loss"] = eval_loss(r["model"], eval_rows)
        r["tokens_per_s"] = tokens / r["epoch_s"]
        print(f"{r['name']}: {r['steps']} steps, epoch {r['epoch_s']:.1f} s, {r['tokens_per_s']:.0f} tokens/s, wall {r['wall_s']:.1f} s, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB, eval loss {r['eval_loss']:.4f}", flush=True)

    if results:
        base = {r["name"]: r for r in results}.get("trl-padded", results[0])
        print(f"\n| run | steps | epoch s | tokens/s | wall s | peak RSS GiB | eval loss | epoch / {base['name']} |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['name']} | {r['steps']} | {r['epoch_s']:.1f} | {r['tokens_per_s']:.0f} | {r['wall_s']:.1f} | {r['peak_rss_gib']:.2f} | "
                  f"{r['eval_loss']:.4f} | {r['epoch_s'] / base['epoch_s']:.2f} |")
        by = {r["name"]: r for r in results}
        if "ours-packed" in by and "ours-padded" in by:
            a, b = by["ours-packed"]["eval_loss"], by["ours-padded"]["eval_loss"]
            print(f"\neval loss ours packed / ours padded: {a / b:.4f} (same steps and examples per step)")
    if "ce" in only:
        ce = ce_memory(root)
        print("\n| cross-entropy, vocab 128256, 2048 tokens, one step | step peak RSS GiB | process peak RSS GiB | seconds | loss |")
        print("|---|---:|---:|---:|---:|")
        for r in ce:
            label = "full logits" if r["chunk"] == 0 else f"chunked ({r['chunk']} tokens)"
            print(f"| {label} | {r['step_peak_gib']:.2f} | {r['peak_rss_gib']:.2f} | {r['seconds']:.2f} | {r['loss']:.5f} |")
    print(f"\nrun directory: {root}")


if __name__ == "__main__":
    main()
