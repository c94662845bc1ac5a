"""Checkpoint save and load speed per engine, against one process's torch.save / torch.load of the
same state, and what a kill costs at the default checkpoint interval.

What it does (under --workdir, a fresh temp dir by default, removed unless --keep):
  1. builds a random-weight Llama (about 110M parameters by default) as a local HF directory;
  2. for each engine (ddp, fsdp, ZeRO-3), 2 ranks, full fine-tuning in float32:
       run A: `python -m launcher run` for 2 steps with a checkpoint after each; the loop writes
              `checkpoint_save_s` rows to metrics.jsonl (all ranks' shards, commit included);
       run B: a new run dir started from A's step 1 (`checkpoint.resume=...`); the worker writes
              `checkpoint_load_s` (every rank's shards read into the engine). Its wall time minus
              the loop's time is the restart overhead a killed job pays before training again;
  3. baseline: in one process, the same state (fp32 weights + AdamW moments) written with one
     torch.save and read with one torch.load;
  4. prints GB of state, seconds and GB/s for each, and ours/baseline ratios of GB/s;
     then the work a kill loses: the restart overhead (measured) plus the steps redone since the
     last checkpoint, which checkpoint.every_minutes bounds (default 30: 15 min on average).

Run (from the repo root):
    python benchmarks/checkpoint.py                          # ~110M parameters, a few minutes on CPU
    python benchmarks/checkpoint.py --hidden 256 --layers 2  # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import REPO, build_model, run, scratch_dir  # noqa: E402  (the same random Llama as the export benchmark)

ENGINES = {
    "ddp": ["strategy.backend=ddp"],
    "fsdp": ["strategy.backend=fsdp"],
    "zero3": ["strategy.backend=deepspeed", "strategy.zero_stage=3"],
}
BASELINE = """
import sys, time, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
for p in model.parameters():
    p.grad = torch.zeros_like(p)
opt.step()  # AdamW state exists: the same tensors a checkpoint holds (weights, exp_avg, exp_avg_sq)
state = {"model": model.state_dict(), "optim": opt.state_dict()}
t = time.perf_counter(); torch.save(state, sys.argv[2]); save = time.perf_counter() - t
del state
t = time.perf_counter(); torch.load(sys.argv[2], weights_only=True); load = time.perf_counter() - t
print(save, load)
"""


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _rows(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _sft(workdir: Path, name: str, base: Path, engine: str, *extra) -> tuple:
    run_dir = workdir / name
    cmd = [sys.executable, "-m", "launcher", "run", "recipes/quickstart.yaml", "--nproc", "2", f"output_dir={run_dir}",
           f"model.path={base}", "model.dtype=float32", f"data.cache_dir={workdir / 'cache'}", "train.micro_batch_size=2",
           "train.max_steps=2", "checkpoint.every_steps=1", "checkpoint.keep_last=2", "train.eval_at_start=false",
           "train.eval_generate=0", "train.eval_every=0", "data.eval_files=[]", "export.on_finish=false", "logging.every_steps=1", *ENGINES[engine], *extra]
    start = time.perf_counter()
    run(cmd, workdir / f"{name}.log")
    return run_dir, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--engines", default="ddp,fsdp,zero3")
    p.add_argument("--workdir", type=Path, help="default: a fresh temporary directory")
    p.add_argument("--keep", action="store_true", help="leave the work dir in place")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    gb = 1e9
    with scratch_dir(args.workdir, args.keep, "sft-ckpt-bench-") as workdir:
        base = workdir / "base"
        params = build_model(base, args.hidden, args.layers, args.hidden * 11 // 4, args.heads, args.vocab)
        print(f"model: {params:,} parameters, float32 training (weights + AdamW moments = {params * 12 / gb:.2f} GB of state), 2 ranks, CPU", flush=True)
        out = subprocess.run([sys.executable, "-c", BASELINE, str(base), str(workdir / "baseline.pt")], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
        base_save, base_load = float(out[-2]), float(out[-1])
        base_gb = (workdir / "baseline.pt").stat().st_size / gb
        (workdir / "baseline.pt").unlink()
        print(f"\n{'':22} {'state GB':>9} {'save s':>8} {'save GB/s':>10} {'load s':>8} {'load GB/s':>10} {'restart s':>10}")
        print(f"{'baseline (1 process)':22} {base_gb:9.2f} {base_save:8.2f} {base_gb / base_save:10.2f} {base_load:8.2f} {base_gb / base_load:10.2f} {'':>10}")
        ratios = []
        for engine in args.engines.split(","):
            first, _ = _sft(workdir, f"{engine}-a", base, engine)
            saves = [r["checkpoint_save_s"] for r in _rows(first) if "checkpoint_save_s" in r]
            ckpt = first / "checkpoints" / "step-000001"
            state_gb = _size(ckpt / "model") / gb
            second, wall = _sft(workdir, f"{engine}-b", base, engine, f"checkpoint.resume={ckpt}")
            rows = _rows(second)
            load = next(r["checkpoint_load_s"] for r in rows if "checkpoint_load_s" in r)
            loop = max(r["elapsed_s"] for r in rows if "elapsed_s" in r) + sum(r.get("checkpoint_save_s", 0) for r in rows)
            save = min(saves)
            ratios.append((engine, (state_gb / save) / (base_gb / base_save), (state_gb / load) / (base_gb / base_load)))
            print(f"{engine:22} {state_gb:9.2f} {save:8.2f} {state_gb / save:10.2f} {load:8.2f} {state_gb / load:10.2f} {wall - loop:10.1f}", flush=True)
        print("\nGB/s ratio, ours / baseline (same machine, same state size order):")
        for engine, s, l in ratios:
            print(f"  {engine:6} save {s:.2f}x  load {l:.2f}x")
        print("\nA kill costs the restart (column 'restart s': process start, data, model, engine, checkpoint load) plus the "
              "steps since the last checkpoint: with the default checkpoint.every_minutes=30, 15 min on average and 30 at most; "
              "every_steps or a smaller every_minutes trade that for the save time above.")


if __name__ == "__main__":
    main()
