"""Peer check: `sft run` reproduces TRL's `SFTTrainer` losses, step by step.

Both sides train the same built-in tiny Llama (fp32, CPU, one process) on the same
prompt/completion file with the same hyperparameters: micro batch 2 x gradient
accumulation 2, AdamW with weight decay, cosine schedule with warmup, gradient clipping,
no packing, no shuffling. Our side is the real CLI (`python -m launcher run`) in a
subprocess; TRL runs in-process.

What it proves, for the first 5 optimizer steps:
- both sides feed the model identical token ids and loss masks (checked before training,
  so a tokenization difference fails loudly instead of showing up as a loss mismatch);
- the loss the launcher logs for each step equals TRL's within 1e-3. Step 1 runs on the
  initial weights and checks the loss and its normalisation over all target tokens of
  the step (completions have very different lengths; a per-micro-batch mean would be
  off by ~4e-3 even on these near-uniform initial logits). Steps 2-5 check that the
  gradients, clipping, AdamW and the LR schedule agree. The LR and weight decay are
  large on purpose: measured on this setup, changing the LR by 2%, the scheduler, the
  warmup, beta1, beta2, eps or the weight decay (0.5 -> 0) on one side moves a later
  loss by 3.6e-3 to 1e-1, and turning clipping off by 5e-2 (its exact threshold barely
  matters here: every step is clipped, and Adam is nearly blind to a uniform rescale);
- the losses really move, so the comparison cannot pass trivially.
"""

import json

import pytest
import torch

from conftest import run_sft

STEPS = 5
MICRO, ACCUM = 2, 2
LR, WARMUP, WEIGHT_DECAY, BETAS, EPS, MAX_GRAD_NORM = 5e-3, 2, 0.5, (0.9, 0.95), 1e-8, 1.0
SEED = 42
MAX_LEN = 128
TOL = 1e-3

WORDS = "red green blue cat dog bird sun moon star tree river stone cloud fire water wind".split()
# Both sides run on one CPU thread: on a busy 2-core box, two contending OpenMP threads
# make these tiny steps ~50x slower. Nothing is downloaded or reported to the Hub.
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _rows():
    """STEPS global batches of prompt/completion pairs, completions of 1 to 16 words.

    Each prompt ends without a space and each completion starts with one, so the
    prompt/completion boundary is a token boundary for this byte-level BPE tokenizer.
    """
    rows = []
    for i in range(STEPS * MICRO * ACCUM):
        n = [1, 16, 3, 11, 2, 7, 14, 1, 5, 9][i % 10]
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n)]
        rows.append({"prompt": f"Q{i}: list {n} words from {WORDS[i % len(WORDS)]}.\nA:", "completion": " " + " ".join(words)})
    return rows


def _launcher_steps(root, data, cache_dir):
    """The CLI's metrics.jsonl rows for steps 1..STEPS."""
    run_dir = root / "launcher-run"
    recipe = root / "peer.yaml"
    recipe.write_text(
        "name: peer-trl\n"
        f"seed: {SEED}\n"
        "model: {path: 'builtin:tiny-llama', dtype: float32}\n"
        f"data: {{train_files: ['{data}'], format: completion, max_seq_len: {MAX_LEN}, shuffle: false}}\n"
    )
    overrides = {
        "output_dir": run_dir, "data.cache_dir": cache_dir,
        "train.micro_batch_size": MICRO, "train.gradient_accumulation_steps": ACCUM, "train.max_steps": STEPS,
        "train.lr": LR, "train.lr_scheduler": "cosine", "train.warmup_steps": WARMUP, "train.weight_decay": WEIGHT_DECAY,
        "train.adam_beta1": BETAS[0], "train.adam_beta2": BETAS[1], "train.adam_eps": EPS, "train.max_grad_norm": MAX_GRAD_NORM,
        "train.eval_every": 0, "logging.every_steps": 1, "export.on_finish": "false",
    }
    proc = run_sft(["run", str(recipe), *(f"{k}={v}" for k, v in overrides.items())], env=SUBPROCESS_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    return steps


def _trl_trainer(root, data, model_path):
    from datasets import load_dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(root / "trl-run"),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP,
        weight_decay=WEIGHT_DECAY,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=EPS,
        max_grad_norm=MAX_GRAD_NORM,
        seed=SEED,
        # fp32 on CPU, as the launcher runs there (SFTConfig defaults to bf16 and checkpointing)
        use_cpu=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        # prompt/completion data, loss on the completion (+ EOS) only, no packing, in file order
        completion_only_loss=True,
        packing=False,
        padding_free=False,
        shuffle_dataset=False,
        train_sampling_strategy="sequential",
        max_length=MAX_LEN,
        dataset_num_proc=None,
        # log every step, to trainer.state.log_history only
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


def _our_rows(data, model_path, cache_dir):
    from launcher.data.prepare import prepare
    from launcher.model import load_tokenizer
    from launcher.recipe import DataConfig, ModelConfig

    tokenizer = load_tokenizer(model_path, ModelConfig(path=str(model_path)))
    cfg = DataConfig(train_files=[str(data)], format="completion", max_seq_len=MAX_LEN, shuffle=False)
    return prepare(cfg, tokenizer, cache_dir, SEED).train, tokenizer


def _per_micro_batch_mean_of_step_1(rows, tokenizer, model_path):
    """Step 1's loss if each micro-batch were averaged on its own and the means averaged."""
    from launcher.data.batches import pad_collate
    from launcher.model import load_model
    from launcher.recipe import ModelConfig
    from launcher.train import token_loss_sum

    model = load_model(model_path, ModelConfig(path=str(model_path)), torch.float32, torch.device("cpu"))
    means = []
    with torch.no_grad():
        for start in range(0, MICRO * ACCUM, MICRO):
            batch = pad_collate(rows["input_ids"][start:start + MICRO], rows["labels"][start:start + MICRO], tokenizer.pad_token_id)
            means.append(float(token_loss_sum(model, batch)) / int((batch["labels"][:, 1:] != -100).sum()))
    return sum(means) / len(means)


@pytest.fixture
def single_thread_offline(monkeypatch):
    """SUBPROCESS_ENV for this process (the Hub reads its settings at import, hence setattr)."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_DISABLE_TELEMETRY", True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_first_five_losses_match_trl_sft_trainer(tmp_path, cache_dir, single_thread_offline):
    from launcher.builtin import materialize

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    model_path = materialize("builtin:tiny-llama", cache_dir)
    trainer = _trl_trainer(tmp_path, data, model_path)

    # The same tokens and loss masks, row for row, in the same order.
    ours, tokenizer = _our_rows(data, model_path, cache_dir)
    assert list(trainer.train_dataset["input_ids"]) == list(ours["input_ids"])
    assert list(trainer.train_dataset["labels"]) == list(ours["labels"])
    assert len({sum(t != -100 for t in labels) for labels in ours["labels"]}) >= 8  # unequal completion lengths

    # The same weight-decay groups: HF decays all but biases and norms (by name); we decay every >= 2-D tensor.
    params = dict(trainer.model.named_parameters())  # the tied lm_head/embedding is listed once
    decayed = set(trainer.get_decay_parameter_names(trainer.model)) & set(params)
    assert decayed == {name for name, p in params.items() if p.ndim >= 2}

    trainer.train()
    trl = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert [h["step"] for h in trl] == list(range(1, STEPS + 1))
    launcher = _launcher_steps(tmp_path, data, cache_dir)

    ours_loss, trl_loss = [r["loss"] for r in launcher], [h["loss"] for h in trl]
    report = "\n".join(f"step {i}: launcher {a:.6f}  trl {b:.6f}  diff {a - b:+.1e}"
                       for i, (a, b) in enumerate(zip(ours_loss, trl_loss), 1))
    print(report)
    for a, b in zip(ours_loss, trl_loss):
        assert abs(a - b) < TOL, report
    for r, h in zip(launcher, trl):
        assert r["lr"] == pytest.approx(h["learning_rate"], rel=1e-6, abs=1e-12)  # the LR used by that step
        assert r["grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-3)  # the norm before clipping
    assert all(h["grad_norm"] > MAX_GRAD_NORM for h in trl)  # so every step is clipped

    # Not trivially equal: the losses fall by far more than the tolerance, and step 1 would
    # be off by ~4e-3 with a per-micro-batch mean.
    assert ours_loss[0] - ours_loss[-1] > 100 * TOL
    assert abs(_per_micro_batch_mean_of_step_1(ours, tokenizer, model_path) - trl_loss[0]) > 2 * TOL
