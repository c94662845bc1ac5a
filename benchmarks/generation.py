"""Time of the quickstart's exact-match evaluation (200 generated replies), one prompt at a time
(`train.eval_generate_batch_size=1`, the old path's decoding, now in lockstep) against batched
(the default: the micro batch, 16), on ddp and ZeRO-3 with 2 ranks.

Each case is one `sft run recipes/quickstart.yaml --nproc 2` of 1 training step whose final
evaluation generates 200 replies; the time is the run's `eval_generate_s` (metrics.jsonl: from
the first prompt to the last rank's last token). Prints a table and the unbatched/batched ratio.

Run (from the repo root):
    python benchmarks/generation.py                 # ddp and ZeRO-3, batch 1 vs 16
    python benchmarks/generation.py --engines ddp   # one engine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENGINES = {
    "ddp": ["strategy.backend=ddp"],
    "fsdp": ["strategy.backend=fsdp"],
    "zero3": ["strategy.backend=deepspeed", "strategy.zero_stage=3"],
}


def one(engine: str, batch: int, work: Path, generate: int) -> dict:
    run_dir = work / f"{engine}-b{batch}"
    cmd = [sys.executable, "-m", "launcher", "run", "recipes/quickstart.yaml", "--nproc", "2", f"output_dir={run_dir}",
           f"data.cache_dir={work / 'cache'}", "train.max_steps=1", "train.eval_at_start=false", f"train.eval_generate={generate}",
           f"train.eval_generate_batch_size={batch}", "export.on_finish=false", "checkpoint.every_minutes=0", *ENGINES[engine]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    if proc.returncode != 0:
        raise SystemExit(f"{engine} batch {batch} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if "eval_generate_s" in r][-1]
    return {"seconds": ev["eval_generate_s"], "exact_match": ev["eval_exact_match"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=["ddp", "zero3"], choices=sorted(ENGINES))
    ap.add_argument("--batch", type=int, default=16, help="the batched case's eval_generate_batch_size (default 16, the quickstart's micro batch)")
    ap.add_argument("--generate", type=int, default=200, help="replies generated (default 200, the quickstart's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sft-bench-gen-") as tmp:
        work = Path(tmp)
        print(f"| engine (2 ranks) | {args.generate} replies, batch 1: s | batch {args.batch}: s | ratio | exact match (1 / {args.batch}) |")
        print("|---|---:|---:|---:|---|")
        for engine in args.engines:
            single = one(engine, 1, work, args.generate)
            batched = one(engine, args.batch, work, args.generate)
            ratio = single["seconds"] / max(batched["seconds"], 1e-9)
            print(f"| {engine} | {single['seconds']:.1f} | {batched['seconds']:.1f} | {ratio:.1f}x | "
                  f"{single['exact_match']:.3f} / {batched['exact_match']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
