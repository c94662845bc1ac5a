"""Peer check: `sft run` reproduces TRL's `SFTTrainer` losses, step by step.

Both sides train the same built-in tiny Llama (fp32, CPU, one process) on the same
prompt/completion file with the same hyperparameters: micro batch 2 x gradient
accumulation 2, AdamW with weight decay, cosine schedule with warmup, gradient clipping,
no packing, no shuffling. Completions have very different lengths, so each step's loss
depends on normalising over all the target tokens of the step (not per micro-batch).

What it proves, for the first 5 optimizer steps:
- both sides feed the model identical token ids and loss masks (checked first, so a
  tokenization difference fails loudly instead of showing up as a loss mismatch);
- the loss the launcher logs for each step equals TRL's within 1e-3: step 1 checks the
  loss and its normalisation on the initial weights, steps 2-5 check that gradients,
  clipping, AdamW (weight-decay groups included) and the LR schedule agree;
- the losses really move, so the comparison cannot pass trivially.

Our side is the real CLI (`python -m launcher run`), in a subprocess; TRL runs in-process.
"""

import json
import math

import pytest

from conftest import run_sft

STEPS = 5
MICRO, ACCUM = 2, 2
HYPER = dict(lr=2e-3, warmup_steps=2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, max_grad_norm=1.0)
SEED = 42
MAX_LEN = 128
TOL = 1e-3

WORDS = "red green blue cat dog bird sun moon star tree river stone cloud fire water wind".split()


def _rows():
    """STEPS global batches of prompt/completion pairs, completions 1 to 16 words long.

    Each prompt ends without a space and each completion starts with one, so the
    prompt/completion boundary is a token boundary for this byte-level BPE tokenizer.
    """
    rows = []
    for i in range(STEPS * MICRO * ACCUM):
        n = [1, 16, 3, 11, 2, 7, 14, 1, 5, 9][i % 10]
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n)]
        rows.append({"prompt": f"Q{i}: list {n} word{'s' if n > 1 else ''} from {WORDS[i % len(WORDS)]}.\nA:", "completion": " " + " ".join(words)})
    return rows


@pytest.fixture(scope="module")
def peer_setup(tmp_path_factory, cache_dir):
    from launcher.builtin import materialize

    root = tmp_path_factory.mktemp("peer-trl")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return root, data, materialize("builtin:tiny-llama", cache_dir)


def _launcher_losses(root, data, cache_dir):
    run_dir = root / "launcher-run"
    recipe = root / "peer.yaml"
    recipe.write_text(
        "name: peer-trl\n"
        f"seed: {SEED}\n"
        "model: {path: 'builtin:tiny-llama', dtype: float32}\n"
        f"data: {{train_files: ['{data}'], format: completion, max_seq_len: {MAX_LEN}, shuffle: false}}\n"
    )
    t = HYPER
    proc = run_sft([
        "run", str(recipe), f"output_dir={run_dir}", f"data.cache_dir={cache_dir}",
        f"train.micro_batch_size={MICRO}", f"train.gradient_accumulation_steps={ACCUM}", f"train.max_steps={STEPS}",
        f"train.lr={t['lr']}", "train.lr_scheduler=cosine", f"train.warmup_steps={t['warmup_steps']}",
        f"train.weight_decay={t['weight_decay']}", f"train.adam_beta1={t['adam_beta1']}", f"train.adam_beta2={t['adam_beta2']}",
        f"train.adam_eps={t['adam_eps']}", f"train.max_grad_norm={t['max_grad_norm']}", "train.eval_every=0",
        "logging.every_steps=1", "export.on_finish=false",
    ], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    return steps


def _our_tokenization(data, model_path, cache_dir):
    from launcher.data.prepare import prepare
    from launcher.model import load_tokenizer
    from launcher.recipe import DataConfig, ModelConfig

    tok = load_tokenizer(model_path, ModelConfig(path=str(model_path)))
    cfg = DataConfig(train_files=[str(data)], format="completion", max_seq_len=MAX_LEN, shuffle=False)
    train = prepare(cfg, tok, cache_dir, SEED).train
    return train["input_ids"], train["labels"]


def _trl_trainer(root, data, model_path):
    from datasets import load_dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    t = HYPER
    args = SFTConfig(
        output_dir=str(root / "trl-run"),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM,
        max_steps=STEPS,
        learning_rate=t["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=t["warmup_steps"],
        weight_decay=t["weight_decay"],
        adam_beta1=t["adam_beta1"],
        adam_beta2=t["adam_beta2"],
        adam_epsilon=t["adam_eps"],
        max_grad_norm=t["max_grad_norm"],
        seed=SEED,
        data_seed=SEED,
        # fp32 on CPU, as the launcher runs there (SFTConfig defaults to bf16 and gradient checkpointing)
        bf16=False,
        fp16=False,
        use_cpu=True,
        activation_checkpointing=False,  # TRL's default is on; the new name overrides it
        # data: prompt/completion, loss on the completion (+ EOS) only, no packing, in file order
        completion_only_loss=True,
        packing=False,
        padding_free=False,
        shuffle_dataset=False,
        train_sampling_strategy="sequential",
        max_length=MAX_LEN,
        dataset_num_proc=None,
        # logging: every step, nowhere but trainer.state.log_history
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(root / "hf-datasets"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    trainer = SFTTrainer(model=str(model_path), args=args, train_dataset=dataset, processing_class=tokenizer)
    assert isinstance(trainer._get_train_sampler(), SequentialSampler)
    return trainer


def test_losses_match_trl_sft_trainer(peer_setup, cache_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    root, data, model_path = peer_setup

    trainer = _trl_trainer(root, data, model_path)

    # Same tokens and the same loss mask, row for row, before any training.
    our_ids, our_labels = _our_tokenization(data, model_path, cache_dir)
    trl_data = trainer.train_dataset
    assert trl_data["input_ids"] == our_ids
    assert trl_data["labels"] == our_labels
    assert len(set(sum(1 for t in lab if t != -100) for lab in our_labels)) > 5  # completions of unequal length

    # Same weight-decay groups: HF decays all but biases and norms (by name); we decay every >= 2-D tensor.
    params = dict(trainer.model.named_parameters())  # tied lm_head/embedding listed once
    decayed = set(trainer.get_decay_parameter_names(trainer.model)) & set(params)
    assert decayed == {n for n, p in params.items() if p.ndim >= 2}

    trainer.train()
    trl = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert [h["step"] for h in trl] == list(range(1, STEPS + 1))

    ours = _launcher_losses(root, data, cache_dir)

    ours_loss = [r["loss"] for r in ours]
    trl_loss = [h["loss"] for h in trl]
    report = "\n".join(f"step {i + 1}: launcher {a:.6f}  trl {b:.6f}  diff {a - b:+.2e}" for i, (a, b) in enumerate(zip(ours_loss, trl_loss)))
    print(report)
    for a, b in zip(ours_loss, trl_loss):
        assert math.isfinite(a) and abs(a - b) < TOL, report
    # Pre-clipping gradient norms agree too (they are > max_grad_norm, so clipping is exercised).
    for r, h in zip(ours, trl):
        assert abs(r["grad_norm"] - h["grad_norm"]) < 1e-3 * max(1.0, h["grad_norm"]), (r["grad_norm"], h["grad_norm"])
    # Not trivially equal: training moves the loss, by much more than the tolerance.
    assert max(ours_loss) - min(ours_loss) > 50 * TOL
    assert ours_loss[-1] < ours_loss[0]
