"""`sft export` against peft's standard merge path: wall time and peak RSS, same inputs.

What it does (everything under --workdir, a fresh temp dir by default, removed unless --keep):
  1. builds a random-weight Llama (about 1.1B parameters by default) as a local HF directory in
     bfloat16 safetensors, with the launcher's built-in tokenizer;
  2. trains one LoRA step on it with the real launcher (`python -m launcher run`, ddp, 1 rank,
     model.dtype=bfloat16, r=16) so there is a run dir with checkpoints/step-000001;
  3. writes the adapter with `python -m launcher export RUN --out adapter --adapter-only`
     (the baseline's input; not measured);
  4. measures, each in a fresh subprocess (peak RSS from os.wait4's rusage of that child):
       ours:     python -m launcher export RUN --out ours   (merged, export.dtype auto = bfloat16;
                 includes the logit verification, i.e. a second load of the exported model)
       baseline: AutoModelForCausalLM.from_pretrained(base, dtype=bf16) + PeftModel.from_pretrained
                 + merge_and_unload() + save_pretrained(max_shard_size="5GB") + tokenizer save
                 (peft's usual recipe, no verification);
  5. prints seconds, peak RSS and ours/baseline ratios, and peak RSS / model size (bf16).

Run (from the repo root):
    python benchmarks/export.py                          # ~1.1B parameters, several minutes on CPU
    python benchmarks/export.py --hidden 256 --layers 2  # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "launcher" / "builtin" / "tokenizer"
TRAIN_FILE = REPO / "recipes" / "data" / "quickstart" / "train.jsonl"

BASELINE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out, max_shard_size="5GB")
AutoTokenizer.from_pretrained(base).save_pretrained(out)
"""


def build_model(path: Path, hidden: int, layers: int, intermediate: int, heads: int, vocab: int) -> int:
    """A random Llama in bfloat16 plus the built-in tokenizer at `path`; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=max(vocab, len(tokenizer)), tie_word_embeddings=False,
        max_position_embeddings=1024, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialise directly in bf16: no fp32 copy
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    return params


def write_recipe(workdir: Path, base: Path) -> Path:
    recipe = {
        "name": "export-bench", "output_dir": str(workdir / "run"), "seed": 0,
        "model": {"path": str(base), "dtype": "bfloat16"},
        "data": {"train_files": [str(TRAIN_FILE)], "format": "messages", "max_seq_len": 64, "cache_dir": str(workdir / "cache")},
        "train": {"micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": 1, "lr": 1e-3},
        "lora": {"enabled": True, "r": 16},
        "strategy": {"backend": "ddp"},
        "launch": {"nproc_per_node": 1},
        "export": {"on_finish": False},
        "logging": {"every_steps": 1},
    }
    path = workdir / "recipe.yaml"
    path.write_text(json.dumps(recipe, indent=2) + "\n")  # JSON is YAML
    return path


@contextlib.contextmanager
def scratch_dir(workdir: Optional[Path], keep: bool, prefix: str):
    """A benchmark's work dir: --workdir or a fresh temporary one, removed at the end unless --keep."""
    path = Path(workdir or tempfile.mkdtemp(prefix=prefix)).resolve()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def run(cmd: list, log: Path) -> None:
    """Run a setup step; on failure show its log and stop."""
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(map(str, cmd))}\n{log.read_text()[-6000:]}")


def measure(cmd: list, log: Path) -> tuple:
    """(wall seconds, peak RSS in bytes) of `cmd` in a fresh process; the process's own peak
    (and that of any children it waited for), from wait4, not this process's RUSAGE_CHILDREN."""
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{log.read_text()[-6000:]}")
    return seconds, usage.ru_maxrss * 1024  # Linux: KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--intermediate", type=int, help="default: 11/4 * hidden (5632 at 2048)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--workdir", type=Path, help="default: a fresh temporary directory")
    p.add_argument("--keep", action="store_true", help="leave the work dir in place")
    args = p.parse_args()
    intermediate = args.intermediate or args.hidden * 11 // 4
    py = sys.executable
    with scratch_dir(args.workdir, args.keep, "sft-export-bench-") as workdir:
        base, run_dir, adapter = workdir / "base", workdir / "run", workdir / "adapter"
        t = time.perf_counter()
        params = build_model(base, args.hidden, args.layers, intermediate, args.heads, args.vocab)
        print(f"base model: {params:,} parameters (hidden {args.hidden}, layers {args.layers}, intermediate "
              f"{intermediate}, heads {args.heads}), bfloat16, built in {time.perf_counter() - t:.0f}s -> {base}", flush=True)
        t = time.perf_counter()
        run([py, "-m", "launcher", "run", str(write_recipe(workdir, base))], workdir / "train.log")
        print(f"LoRA run (1 step): {time.perf_counter() - t:.0f}s -> {run_dir}", flush=True)
        run([py, "-m", "launcher", "export", str(run_dir), "--out", str(adapter), "--adapter-only"], workdir / "adapter.log")
        print(f"adapter: {(workdir / 'adapter.log').read_text().strip().splitlines()[-1]}", flush=True)

        ours_s, ours_rss = measure([py, "-m", "launcher", "export", str(run_dir), "--out", str(workdir / "ours")], workdir / "ours.log")
        print(f"ours: {(workdir / 'ours.log').read_text().strip().splitlines()[-1]}", flush=True)
        base_s, base_rss = measure([py, "-c", BASELINE, str(base), str(adapter), str(workdir / "baseline")], workdir / "baseline.log")

        report = json.loads((workdir / "ours" / "export.json").read_text())
        model_bytes = params * 2  # the export dtype (auto = training dtype = bfloat16)
        gib = 2 ** 30
        print(f"\nexport of {params:,} parameters, {report['dtype']}: model size {model_bytes / gib:.2f} GiB")
        print(f"{'':10} {'seconds':>9} {'peak RSS GiB':>13} {'RSS / model':>12}")
        for name, s, rss in (("ours", ours_s, ours_rss), ("baseline", base_s, base_rss)):
            print(f"{name:10} {s:9.1f} {rss / gib:13.2f} {rss / model_bytes:12.2f}")
        print(f"{'ratio':10} {ours_s / base_s:9.2f} {ours_rss / base_rss:13.2f}   (ours / baseline)")
        print(f"ours includes the logit check (a reload of the exported model): max |diff| "
              f"{report['max_abs_logit_diff']:.3g} <= tolerance {report['tolerance']:.3g}; the baseline does no check.")


if __name__ == "__main__":
    main()
