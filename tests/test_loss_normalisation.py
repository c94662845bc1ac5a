"""The step's gradient is the same however its examples are split into micro-batches and ranks."""

import subprocess
import sys

import torch

from conftest import REPO

HELPER = str(REPO / "tests" / "helpers" / "grads.py")


def _grads(tmp_path, cache_dir, micro, accum, nproc=1, packed=False):
    out = tmp_path / f"g-{micro}-{accum}-{nproc}-{packed}.pt"
    cmd = [sys.executable, HELPER, str(out), str(micro), str(accum), str(cache_dir), *(["packed"] if packed else [])]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def _max_diff(a, b):
    return max((a["grads"][k] - b["grads"][k]).abs().max().item() for k in a["grads"])


def test_gradients_agree_across_micro_batch_accumulation_and_ranks(tmp_path, cache_dir):
    one_batch = _grads(tmp_path, cache_dir, micro=4, accum=1)
    accumulated = _grads(tmp_path, cache_dir, micro=1, accum=4)
    two_ranks = _grads(tmp_path, cache_dir, micro=2, accum=1, nproc=2)
    # packed: each rank's two examples in one padding-free row (rank 0: examples 1 and 0, rank 1: 2 and 3)
    packed_two_ranks = _grads(tmp_path, cache_dir, micro=2, accum=1, nproc=2, packed=True)
    scale = max(g.abs().max().item() for g in one_batch["grads"].values())
    assert scale > 0
    for other in (accumulated, two_ranks, packed_two_ranks):
        assert _max_diff(one_batch, other) < 1e-5 * max(scale, 1.0)
        assert abs(one_batch["loss"] - other["loss"]) < 1e-5


def test_a_per_micro_batch_mean_would_differ(tmp_path, cache_dir):
    """Guards the test above: with these replies, averaging per micro-batch changes the gradient."""
    from launcher.data.batches import pad_collate
    from launcher.data.tokenize import tokenize_conversation
    from launcher.builtin import materialize
    from launcher.model import load_model, load_tokenizer
    from launcher.recipe import ModelConfig
    from launcher.train import token_loss_sum
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.grads import CONVERSATIONS

    cfg = ModelConfig(path="builtin:tiny-llama")
    path = materialize(cfg.path, cache_dir)
    tok = load_tokenizer(path, cfg)
    rows = [tokenize_conversation(tok, c) for c in CONVERSATIONS]

    def grads(groups, per_group_mean):
        model = load_model(path, cfg, torch.float32, torch.device("cpu"))
        total = sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)
        for g in groups:
            b = pad_collate([rows[i]["input_ids"] for i in g], [rows[i]["labels"] for i in g], tok.pad_token_id)
            n = int((b["labels"][:, 1:] != -100).sum())
            (token_loss_sum(model, b) / (n * len(groups) if per_group_mean else total)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    exact = grads([[0, 1, 2, 3]], per_group_mean=False)
    naive = grads([[0], [1], [2], [3]], per_group_mean=True)
    assert (exact - naive).abs().max() > 1e-3 * exact.abs().max()
