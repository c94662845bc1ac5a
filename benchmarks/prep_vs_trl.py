"""Data preparation: ours (`launcher.data.prepare.prepare`) vs TRL's SFTTrainer, on the same rows.

    python benchmarks/prep_vs_trl.py [--rows 100000] [--max-seq-len 1024] [--num-proc N] [--out DIR]

The rows: vs_trl.py's length-skewed `messages` conversations (lognormal reply lengths, median ~120
tokens), written to one JSONL file. The tokenizer: the built-in one (launcher/builtin), whose chat
template marks assistant turns with {% generation %}, so nothing is downloaded.

  ours   `prepare(DataConfig(train_files=[file], format=messages, max_seq_len))` into a fresh cache:
         what `sft plan` / `sft run` do before any worker starts (read the file, digest it, tokenize
         with datasets.map(batched=True, num_proc=data.num_proc), write the cached Arrow file, filter
         and count). num_proc: the default (unset: one process per core for files of 20k+ rows).
  trl    `load_dataset("json", ...)` into a fresh datasets cache, then `SFTTrainer._prepare_dataset`
         (what SFTTrainer's constructor runs on train_dataset: tokenize with the chat template,
         build labels, truncate to max_length, drop fully masked rows), with assistant_only_loss=True
         (loss on the assistant replies, as ours) and dataset_num_proc = the same number of processes
         as ours, for fairness. The trainer itself is built once beforehand, on 8 rows, untimed.
  trl (full loss)   the same with TRL's default assistant_only_loss=False (loss on every token:
         cheaper, since no assistant mask is computed); `--no-trl-full` skips it.

Both write their caches to fresh directories, so neither reuses the other's work. Reported: seconds
and rows/s of each, the ratio, and how many of the first 1,000 rows got identical input_ids and labels.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from vs_trl import write_data  # noqa: E402  (the rows vs_trl.py trains on)


def ours(data: Path, cache: Path, max_len: int, num_proc) -> tuple:
    from launcher.data.prepare import prepare
    from launcher.model import load_tokenizer
    from launcher.recipe import DataConfig, ModelConfig
    from launcher.builtin import TOKENIZER_DIR

    tok = load_tokenizer(TOKENIZER_DIR, ModelConfig(path=str(TOKENIZER_DIR)))
    # Warm-up on 8 rows (untimed), as TRL's trainer is built beforehand: imports and first calls are not preparation.
    warm = cache.parent / "ours-warmup"
    warm.mkdir(parents=True, exist_ok=True)
    (warm / "warm.jsonl").write_text("".join(data.open().readline() for _ in range(1)) * 8)
    prepare(DataConfig(train_files=[str(warm / "warm.jsonl")], format="messages", max_seq_len=max_len, cache_dir=str(warm)), tok, warm, seed=0)
    cfg = DataConfig(train_files=[str(data)], format="messages", max_seq_len=max_len, num_proc=num_proc, cache_dir=str(cache))
    tick = time.perf_counter()
    prepared = prepare(cfg, tok, cache, seed=0)
    return time.perf_counter() - tick, prepared.train


def trl_trainer(root: Path, max_len: int, num_proc, assistant_only: bool):
    """An SFTTrainer on 8 rows (untimed): the object whose _prepare_dataset is timed."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from launcher.builtin import materialize

    model = materialize("builtin:tiny-llama", root / "models")
    tok = AutoTokenizer.from_pretrained(model)
    args = SFTConfig(output_dir=str(root / "trl-out"), use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False,
                     max_length=max_len, packing=False, padding_free=False, assistant_only_loss=assistant_only,
                     dataset_num_proc=num_proc, report_to="none", save_strategy="no", disable_tqdm=True)
    tiny = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 8)
    return SFTTrainer(model=str(model), args=args, train_dataset=tiny, processing_class=tok), tok, args


def trl(data: Path, root: Path, max_len: int, num_proc, assistant_only: bool) -> tuple:
    from datasets import load_dataset

    trainer, tok, args = trl_trainer(root, max_len, num_proc, assistant_only)
    tick = time.perf_counter()
    raw = load_dataset("json", data_files=str(data), split="train", cache_dir=str(root / "hf-datasets"))
    loaded = time.perf_counter() - tick
    ds = trainer._prepare_dataset(raw, tok, args, False, None, "train")
    return time.perf_counter() - tick, loaded, ds


def same_rows(a, b, n: int = 1000) -> int:
    a = a.select(range(min(n, len(a)))).select_columns(["input_ids", "labels"]).to_dict()
    b = b.select(range(min(n, len(b)))).select_columns(["input_ids", "labels"]).to_dict()
    return sum(x == y and u == v for x, y, u, v in zip(a["input_ids"], b["input_ids"], a["labels"], b["labels"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--num-proc", type=int, default=None, help="data.num_proc for ours (default: unset, ours picks); TRL gets the same")
    p.add_argument("--no-trl-full", action="store_true", help="skip TRL with its default full-sequence loss")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from launcher.data.prepare import _num_proc
    from launcher.recipe import DataConfig

    root = Path(args.out or tempfile.mkdtemp(prefix="prep-vs-trl-"))
    root.mkdir(parents=True, exist_ok=True)
    data = root / "train.jsonl"
    write_data(data, args.rows, seed=1)
    data.read_bytes()  # into the page cache, so the first one timed does not pay the disk alone
    procs = _num_proc(DataConfig(num_proc=args.num_proc), args.rows) or 1
    print(f"{args.rows} rows ({data.stat().st_size / 2**20:.1f} MiB), max_seq_len {args.max_seq_len}, {procs} processes each "
          f"(ours: data.num_proc {'unset' if args.num_proc is None else args.num_proc}; TRL: dataset_num_proc {procs}), "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start", flush=True)

    results = []
    secs, train = ours(data, root / "ours-cache", args.max_seq_len, args.num_proc)
    lengths = sorted(len(x) for x in train["input_ids"])
    print(f"ours: {secs:.1f} s, {args.rows / secs:.0f} rows/s; {len(train)} rows kept, median {lengths[len(lengths) // 2]} tokens, "
          f"p95 {lengths[int(0.95 * len(lengths))]}, max {lengths[-1]}", flush=True)
    results.append(("ours: prepare()", secs, None))
    modes = [True] + ([] if args.no_trl_full else [False])
    for assistant_only in modes:
        name = "trl: load_dataset + _prepare_dataset" + ("" if assistant_only else " (full loss)")
        secs, loaded, ds = trl(data, root / f"trl-{'assistant' if assistant_only else 'full'}", args.max_seq_len, procs if procs > 1 else None, assistant_only)
        match = same_rows(train, ds) if assistant_only else None
        print(f"{name}: {secs:.1f} s (load {loaded:.1f} s), {args.rows / secs:.0f} rows/s; {len(ds)} rows"
              + (f"; first 1000 rows identical to ours: {match}" if match is not None else ""), flush=True)
        results.append((name, secs, match))

    base = results[0][1]
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")
    print(f"| {args.rows} rows, {procs} processes | seconds | rows/s | seconds / ours |")
    print("|---|---:|---:|---:|")
    for name, secs, _ in results:
        print(f"| {name} | {secs:.1f} | {args.rows / secs:.0f} | {secs / base:.2f} |")
    print(f"\nrun directory: {root}")


if __name__ == "__main__":
    main()
