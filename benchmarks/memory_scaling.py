"""Per-rank bytes of parameters, gradients and optimizer state for every engine, measured.

Worker (one engine, under torchrun; a plain `python benchmarks/memory_scaling.py --engine ...` for one rank):
    python -m torch.distributed.run --standalone --nproc_per_node=N benchmarks/memory_scaling.py \
        --engine {ddp,deepspeed,fsdp} [--stage S] --out FILE.json
Driver (no --engine): runs the worker for ddp, deepspeed ZeRO-1/2/3 and fsdp at N=1 and N=2
and prints a table next to the ZeRO paper's formulas.

How the numbers are measured (nothing is computed from a formula):
  The builtin tiny-llama (fp32, CPU) takes one full optimizer step through the engine interface
  (so AdamW state exists), then a second forward/backward and step. Three snapshots are taken:
  A after the last backward (gradients at their peak: ZeRO frees or partitions them in step),
  B inside the step, just before the inner torch AdamW updates (a step pre-hook), and C after
  the step. In each snapshot every tensor this rank holds is counted once per distinct storage
  (deduplicated by `untyped_storage().data_ptr()`, counting the storage's full nbytes, so
  padding and flat-buffer slack count): only local shards (`DTensor.to_local()` for FSDP,
  `param.ds_tensor` for ZeRO-3). Sources, in priority order (a storage counts in the first):
    params    - model parameters (the local shard / ZeRO-3 partition; ZeRO-1/2 params are views
                into DeepSpeed's bit16_groups_flat, which is then the same storage)
    optimizer - the torch AdamW `.state` (exp_avg, exp_avg_sq, step), plus "master": DeepSpeed's
                fp32 partitions (single_partition_of_fp32_groups / fp32_partitioned_groups_flat)
                when they are a separate storage
    grads     - `param.grad` (local), the fp32 partitions' `.grad`, and every tensor reachable from
                the DeepSpeed ZeRO optimizer object under an attribute whose name mentions grad/ipg
                (averaged_gradients, grads_in_partition, ipg buckets, grad_partitions_flat_buffer,
                __param_id_to_grad_partition, ...)
    other     - any other tensor reachable from the DeepSpeed ZeRO optimizer object (reported with
                its attribute path, never added to the total)
  Reported: params and optimizer from C, grads from A, total = their sum; B's gradient bytes (DeepSpeed
  flattens a second copy for the fp32 partition's .grad inside step) and ZeRO's fixed-size ipg bucket
  buffers are reported beside it, not in the total.
  Not reachable from Python, so not counted: DDP's reducer buckets (a second gradient-sized
  buffer at N>1 unless gradient_as_bucket_view), FSDP's transient unsharded all-gather buffers,
  activations, and allocator caching.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONVERSATIONS = [
    [{"role": "user", "content": "repeat: a b c d"}, {"role": "assistant", "content": "a b c d"}],
    [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two three four five"}],
]
CONFIGS = [("ddp", None), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3), ("fsdp", None)]


def label(engine: str, stage) -> str:
    return f"zero-{stage}" if engine == "deepspeed" else engine


# --------------------------------------------------------------------------- measurement


class Ledger:
    """Bytes per category, each storage counted once, with where every storage came from."""

    def __init__(self):
        self.seen = {}  # data_ptr -> category
        self.bytes = {"params": 0, "grads": 0, "optimizer": 0, "master": 0, "buckets": 0, "other": 0}
        self.sources = {}  # "category: path" -> bytes

    def add(self, t, category: str, path: str) -> None:
        import torch

        if t is None or not torch.is_tensor(t):
            return
        if hasattr(t, "to_local"):  # DTensor: only this rank's shard
            t = t.to_local()
        if t.device.type == "meta":
            return
        try:
            storage = t.untyped_storage()
        except Exception:  # tensors without storage (e.g. some wrappers) cannot be counted
            return
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self.seen:
            return
        self.seen[ptr] = category
        self.bytes[category] += nbytes
        key = category + ": " + re.sub(r"\[[^\]]*\]", "[]", path)
        self.sources[key] = self.sources.get(key, 0) + nbytes

    def result(self) -> dict:
        b = dict(self.bytes)
        b["optimizer_total"] = b["optimizer"] + b["master"]
        b["total"] = b["params"] + b["grads"] + b["optimizer_total"]
        return {"bytes": b, "sources": dict(sorted(self.sources.items()))}


def _zero_optimizer(engine):
    """DeepSpeed's ZeRO optimizer object (None for the other engines or stage 0)."""
    ds = getattr(engine, "model", None)
    opt = getattr(ds, "optimizer", None)
    return opt if opt is not None and type(opt).__module__.startswith("deepspeed") else None


def _walk(obj, path, visit, seen, depth=0):
    """Every tensor reachable from a DeepSpeed object through attributes, lists and dicts."""
    import torch

    if depth > 8:
        return
    if torch.is_tensor(obj):
        visit(obj, path)
        if obj.is_leaf and obj.grad is not None:
            visit(obj.grad, path + ".grad")
        return
    if id(obj) in seen or isinstance(obj, (torch.nn.Module, str, bytes, int, float, bool)) or obj is None:
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple, set)):
        for i, x in enumerate(obj):
            _walk(x, f"{path}[{i}]", visit, seen, depth + 1)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _walk(v, f"{path}[{k}]", visit, seen, depth + 1)
    elif isinstance(obj, torch.optim.Optimizer) or type(obj).__module__.startswith("deepspeed"):
        for k, v in list(vars(obj).items()) if hasattr(obj, "__dict__") else []:
            _walk(v, f"{path}.{k}", visit, seen, depth + 1)


def snapshot(engine, params) -> dict:
    led = Ledger()
    # 1. parameters this rank holds
    for name, p in params:
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the partition; p.data is released (empty) here
            led.add(p.ds_tensor, "params", f"{name}.ds_tensor")
            led.add(p.data, "params", f"{name}.data (gathered)")
        else:
            led.add(p.data if not hasattr(p, "to_local") else p, "params", name)
    # 2. torch AdamW state
    for state in engine.optimizer.state.values():
        for k, v in state.items():
            led.add(v, "optimizer", f"AdamW.state.{k}")
    zopt = _zero_optimizer(engine)
    # 3. DeepSpeed's fp32 master partitions (only if a storage of their own)
    if zopt is not None:
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            for i, t in enumerate(getattr(zopt, attr, None) or []):
                led.add(t, "master", f"zero.{attr}[]")
    # 4. gradients
    for name, p in params:
        led.add(p.grad, "grads", f"{name}.grad")
        if hasattr(p, "ds_tensor"):
            led.add(getattr(p.ds_tensor, "grad", None), "grads", f"{name}.ds_tensor.grad")
    if zopt is not None:
        def visit(t, path):
            low = path.lower()
            # ipg buckets: fixed-size communication buffers (reduce_bucket_size elements), not P-sized
            led.add(t, "buckets" if "ipg" in low else "grads" if "grad" in low else "other", path)

        _walk(zopt, "zero", visit, set())
    return led.result()


# --------------------------------------------------------------------------- worker


def worker(args) -> None:
    import torch
    import torch.distributed as torch_dist

    from launcher import dist as dist_mod
    from launcher import engines
    from launcher.builtin import materialize
    from launcher.data.batches import pad_collate
    from launcher.data.tokenize import tokenize_conversation
    from launcher.model import load_model, load_tokenizer
    from launcher.recipe import load_recipe
    from launcher.train import accumulate_gradients

    dist = dist_mod.init()
    overrides = [f"strategy.backend={args.engine}", f"data.cache_dir={args.cache}"]
    if args.engine == "deepspeed":
        overrides.append(f"strategy.zero_stage={args.stage}")
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", overrides)
    with dist.local_main_first():
        path = materialize(recipe.model.path, Path(args.cache))
    tokenizer = load_tokenizer(path, recipe.model)
    torch.manual_seed(0)
    with engines.model_init(recipe, dist, 1):
        model = load_model(path, recipe.model, torch.float32, dist.device)
    # P: distinct parameters (tie_word_embeddings: embed_tokens and lm_head are one).
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine = engines.build(recipe, model, dist, 1)
    params = list(model.named_parameters())
    rows = [tokenize_conversation(tokenizer, c) for c in CONVERSATIONS]
    batch = pad_collate([r["input_ids"] for r in rows], [r["labels"] for r in rows], tokenizer.pad_token_id)
    batch = {k: v.to(dist.device) for k, v in batch.items()}

    snaps = {}
    hook_on = {"armed": False}

    def pre_step(optimizer, a, kw):
        # DeepSpeed steps the inner AdamW once per parameter group: keep the one holding most gradient bytes.
        if hook_on["armed"]:
            snap = snapshot(engine, params)
            if "B_in_step" not in snaps or snap["bytes"]["grads"] > snaps["B_in_step"]["bytes"]["grads"]:
                snaps["B_in_step"] = snap

    engine.optimizer.register_step_pre_hook(pre_step)
    engine.model.train()
    # Step 1 creates the AdamW state; step 2 is measured.
    accumulate_gradients(engine, [batch], dist)
    engine.clip_and_step(recipe.train.max_grad_norm)
    accumulate_gradients(engine, [batch], dist)
    snaps["A_after_backward"] = snapshot(engine, params)
    hook_on["armed"] = True
    engine.clip_and_step(recipe.train.max_grad_norm)
    hook_on["armed"] = False
    snaps["C_after_step"] = snapshot(engine, params)

    grads_peak = snaps["A_after_backward"]["bytes"]["grads"]
    c = snaps["C_after_step"]["bytes"]
    mine = {
        "rank": dist.rank,
        "params": c["params"],
        "grads": grads_peak,
        "optimizer": c["optimizer_total"],
        "optimizer_state": c["optimizer"],
        "master": c["master"],
        "grads_in_step": snaps.get("B_in_step", snaps["A_after_backward"])["bytes"]["grads"],
        "buckets": max(s["bytes"]["buckets"] for s in snaps.values()),
        "other": max(s["bytes"]["other"] for s in snaps.values()),
        "total": c["params"] + grads_peak + c["optimizer_total"],
        "snapshots": snaps,
        "in_step_snapshot_taken": "B_in_step" in snaps,
    }
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        every = [None] * torch_dist.get_world_size()
        torch_dist.all_gather_object(every, mine)
    else:
        every = [mine]
    if dist.is_main:
        out = {
            "engine": args.engine,
            "stage": args.stage,
            "label": label(args.engine, args.stage),
            "world_size": dist.world_size,
            "P": n_params,
            "dtype": "float32",
            "ranks": every,
        }
        Path(args.out).write_text(json.dumps(out, indent=1))
    dist_mod.shutdown()


# --------------------------------------------------------------------------- driver


def run_worker(engine: str, stage, nproc: int, out: Path, cache: Path, timeout: int = 600) -> dict:
    """Run one worker under torchrun; returns its JSON or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--engine", engine, "--out", str(out), "--cache", str(cache)]
    if nproc > 1:  # one rank runs as a plain process (as `sft run` does); the engines make their own group
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if stage is not None:
        cmd += ["--stage", str(stage)]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    if nproc == 1:  # DeepSpeed asserts LOCAL_RANK is set
        env.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        # torchrun's summary comes last; the worker's own traceback is in the [rankN] lines before it.
        lines = (proc.stderr or proc.stdout).splitlines()
        cause = [line for line in lines if line.startswith("[rank") and "Warning" not in line]
        return {"error": "\n".join(cause[-40:] + lines[-15:])}
    return json.loads(out.read_text())


def fp32_formula(lbl: str, P: int, N: int) -> dict:
    """Bytes per rank for fp32 AdamW (4-byte params and grads, 8 bytes of moments), no master copy."""
    f = {
        "ddp": (4 * P, 4 * P, 8 * P),  # 16P
        "zero-1": (4 * P, 4 * P, 8 * P / N),  # 8P + 8P/N
        "zero-2": (4 * P, 4 * P / N, 8 * P / N),  # 4P + 12P/N
        "zero-3": (4 * P / N, 4 * P / N, 8 * P / N),  # 16P/N
        "fsdp": (4 * P / N, 4 * P / N, 8 * P / N),  # 16P/N
    }[lbl]
    return {"params": f[0], "grads": f[1], "optimizer": f[2], "total": sum(f)}


FP32_TEXT = {"ddp": "16P", "zero-1": "8P+8P/N", "zero-2": "4P+12P/N", "zero-3": "16P/N", "fsdp": "16P/N"}
MIXED_TEXT = {"ddp": "16P", "zero-1": "4P+12P/N", "zero-2": "2P+14P/N", "zero-3": "16P/N", "fsdp": "16P/N"}


def mixed_formula(lbl: str, P: int, N: int) -> float:
    return {"ddp": 16 * P, "zero-1": 4 * P + 12 * P / N, "zero-2": 2 * P + 14 * P / N,
            "zero-3": 16 * P / N, "fsdp": 16 * P / N}[lbl]


def driver(args) -> int:
    results = {}
    with tempfile.TemporaryDirectory(prefix="memory-scaling-") as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()
        for n in args.nprocs:
            for engine, stage in CONFIGS:
                lbl = label(engine, stage)
                print(f"running {lbl} at N={n} ...", file=sys.stderr, flush=True)
                results[(lbl, n)] = run_worker(engine, stage, n, Path(tmp) / f"{lbl}-{n}.json", cache)
    P = next((r["P"] for r in results.values() if "P" in r), None)
    print()
    print("Per-rank bytes (rank 0), builtin:tiny-llama, fp32 AdamW on CPU, after a real optimizer step.")
    print(f"P = {P} distinct parameters (tied embed/lm_head counted once).")
    print("Measured: distinct storages this rank holds (params & optimizer after the step; grads at their peak,")
    print("right after the last backward, before step). formula = fp32 Adam, no master copy:")
    print("  " + ", ".join(f"{k} {v}" for k, v in FP32_TEXT.items()) + "  (4P params + 4P grads + 8P Adam moments).")
    print("Mixed-precision formulas from the issue (reference only; not what runs here): "
          + ", ".join(f"{k} {v}" for k, v in MIXED_TEXT.items()) + ".")
    print()
    head = f"{'engine':8} {'N':>2} {'params':>9} {'grads':>9} {'optim':>9} {'(master)':>9} {'total':>9} {'fp32 f.':>9} {'meas/f':>6} {'mixed f.':>9} {'vs ddp':>6} {'in-step g':>9} {'buckets':>10} {'other':>5}"
    print(head)
    print("-" * len(head))
    for n in args.nprocs:
        ddp = results.get(("ddp", n), {})
        ddp_total = ddp["ranks"][0]["total"] if "ranks" in ddp else None
        for engine, stage in CONFIGS:
            lbl = label(engine, stage)
            r = results[(lbl, n)]
            if "ranks" not in r:
                print(f"{lbl:8} {n:>2} unavailable: {r['error'].strip().splitlines()[-1][:120] if r['error'].strip() else 'no output'}")
                continue
            m = r["ranks"][0]
            f = fp32_formula(lbl, r["P"], n)
            vs = f"{m['total'] / ddp_total:6.3f}" if ddp_total else "   n/a"
            print(f"{lbl:8} {n:>2} {m['params']:>9} {m['grads']:>9} {m['optimizer']:>9} {m['master']:>9} {m['total']:>9} "
                  f"{f['total']:>9.0f} {m['total'] / f['total']:>6.3f} {mixed_formula(lbl, r['P'], n):>9.0f} {vs} {m['grads_in_step']:>9} {m['buckets']:>10} {m['other']:>5}")
    print()
    print("Columns: optim = AdamW state + master; (master) = DeepSpeed's fp32 partition copy when it is a separate")
    print("storage (in fp32 training it duplicates the parameters); other = further tensors reachable from the ZeRO")
    print("optimizer, not in total; in-step g = gradient bytes inside step (DeepSpeed flattens a second copy for the")
    print("fp32 partition's .grad), not in total; buckets = ZeRO ipg bucket buffers (reduce_bucket_size, independent of P),")
    print("not in total. grads column = after the last backward, before step. Not counted (unreachable from Python): DDP reducer buckets, FSDP all-gather buffers.")
    if args.sources:
        for (lbl, n), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if "ranks" not in r:
                continue
            print(f"\n{lbl} N={n} sources (rank 0):")
            for snap_name, snap in r["ranks"][0]["snapshots"].items():
                print(f"  {snap_name}: {snap['bytes']}")
                for k, v in snap["sources"].items():
                    print(f"      {v:>9}  {k}")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k[0]}@{k[1]}": v for k, v in results.items()}, indent=1))
    return 0 if all("ranks" in r for r in results.values()) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=["ddp", "deepspeed", "fsdp"])
    ap.add_argument("--stage", type=int, default=None)
    ap.add_argument("--out")
    ap.add_argument("--cache", default=None, help="cache dir for the builtin model (default: a temp dir)")
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="driver: world sizes to run")
    ap.add_argument("--sources", action="store_true", help="driver: print where every counted storage came from")
    ap.add_argument("--json", help="driver: also write all results to this file")
    args = ap.parse_args(argv)
    if args.engine is None:
        return driver(args)
    if args.engine == "deepspeed" and args.stage not in (0, 1, 2, 3):
        ap.error("--engine deepspeed needs --stage 0-3")
    if not args.out:
        ap.error("--out is required with --engine")
    if args.cache is None:
        args.cache = tempfile.mkdtemp(prefix="memory-scaling-cache-")
    worker(args)
    return 0


if __name__ == "__main__":
    code = main()
    if "--engine" in sys.argv:  # a worker rank: see launcher.dist.exit_process
        from launcher.dist import exit_process

        exit_process(code or 0)
    sys.exit(code)
