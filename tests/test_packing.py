"""Packing: no contamination (shown by losses and gradients), equal micro-batch counts, pure order,
no 2-D mask with packed rows, length grouping, and the plan's refusals. In-process, one rank."""

import re

import pytest
import torch

from launcher.data.batches import BatchPlan, pad_collate
from launcher.data.packing import PACKED_KEYS, best_fit_decreasing, collate_packed, pack_step
from launcher.data.tokenize import IGNORE


# Examples of very different lengths (tokens of the built-in tokenizer's vocabulary).
LENGTHS = [37, 5, 61, 18, 2, 44]


@pytest.fixture(scope="module")
def tiny(cache_dir):
    from launcher.builtin import materialize

    return materialize("builtin:tiny-llama", cache_dir)


def _examples():
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in LENGTHS:
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        labels = [IGNORE if i < n // 3 else t for i, t in enumerate(ids)]  # a prompt, then targets
        rows.append((ids, labels))
    return rows


def _model(path, attn, packing):
    from launcher.model import load_model
    from launcher.recipe import ModelConfig

    torch.manual_seed(0)
    return load_model(path, ModelConfig(path=str(path), attn_implementation=attn), torch.float32, torch.device("cpu"), packing=packing)


def _per_token(logits, labels):
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE, reduction="none")


def _packed_losses(model, rows):
    batch = collate_packed([r[0] for r in rows], [r[1] for r in rows], pad_id=0)
    tok = _per_token(model(**{k: batch[k] for k in PACKED_KEYS}).logits, batch["labels"])
    bounds = batch["cu_seq_lens_q"].tolist()
    # token t predicts label t+1: example i's losses are at positions [start, end - 1)
    return torch.stack([tok[s : e - 1].sum() for s, e in zip(bounds[:-1], bounds[1:])])


def _one_by_one_losses(model, rows):
    out = []
    for ids, labels in rows:
        out.append(_per_token(model(input_ids=torch.tensor([ids])).logits, torch.tensor([labels])).sum())
    return torch.stack(out)


def _grads(model, losses):
    model.zero_grad()
    losses.sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_row_gives_each_example_its_own_loss_and_gradient(tiny, attn):
    rows = _examples()
    packed_model, reference = _model(tiny, attn, packing=True), _model(tiny, attn, packing=False)
    assert packed_model.config._attn_implementation == f"sft_{attn}"
    packed, alone = _packed_losses(packed_model, rows), _one_by_one_losses(reference, rows)
    assert torch.allclose(packed, alone, rtol=1e-5, atol=1e-5), (packed, alone)
    g_packed, g_alone = _grads(packed_model, packed), _grads(reference, alone)
    assert (g_packed - g_alone).abs().max() <= 1e-5 * max(1.0, g_alone.abs().max().item())


def test_a_two_d_mask_on_a_packed_row_would_contaminate(tiny):
    """Guards the test above: transformers' own sdpa with an all-ones mask attends across examples."""
    rows = _examples()
    model = _model(tiny, "sdpa", packing=False)
    batch = collate_packed([r[0] for r in rows], [r[1] for r in rows], pad_id=0)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=torch.ones_like(batch["input_ids"])).logits
    tok = _per_token(logits, batch["labels"])
    bounds = batch["cu_seq_lens_q"].tolist()
    contaminated = torch.stack([tok[s : e - 1].sum() for s, e in zip(bounds[:-1], bounds[1:])])
    alone = _one_by_one_losses(model, rows)
    assert (contaminated[1:] - alone[1:]).abs().max() > 1e-3  # only the first example sees no neighbour


def test_no_attention_mask_reaches_the_model_with_packed_rows(tiny, cache_dir):
    """The real step path (step_batches -> accumulate_gradients): every forward gets packed inputs, no mask."""
    from datasets import Dataset

    from launcher import dist as dist_mod
    from launcher.engines.ddp import DDPEngine
    from launcher.recipe import TrainConfig
    from launcher.train import Schedule, accumulate_gradients, step_batches

    rows = _examples() * 4
    data = Dataset.from_dict({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]})
    lengths = [len(r[0]) for r in rows]
    plan = BatchPlan(len(rows), 4, 2, 1, seed=3, shuffle=True, lengths=lengths, pack_tokens=128)
    model = _model(tiny, "sdpa", packing=True)
    seen = []

    def check(module, args, kwargs):
        seen.append(kwargs)
        assert kwargs.get("attention_mask") is None, "a 2-D attention mask reached the model with packed rows"
        assert "position_ids" in kwargs and "cu_seq_lens_q" in kwargs

    model.register_forward_pre_hook(check, with_kwargs=True)
    dist = dist_mod.init()
    engine = DDPEngine.create(model, TrainConfig(), dist)
    batches = step_batches(data, Schedule(plan, 1, 0), 0, 0, 0, torch.device("cpu"))
    stats = accumulate_gradients(engine, batches, dist)
    assert len(seen) == len(batches) >= 2
    # the packed step's loss is the token-exact loss of the same 8 examples, padded
    chosen = plan.step_examples(0)
    padded = pad_collate([rows[i][0] for i in chosen], [rows[i][1] for i in chosen], 0)
    reference = _model(tiny, "sdpa", packing=False)
    with torch.no_grad():
        logits = reference(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    target = padded["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE)
    assert stats["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert stats["target_tokens"] == int((target != IGNORE).sum())


def test_packing_is_best_fit_decreasing_within_budget():
    lengths = [7, 5, 4, 3, 3, 2, 1]
    bins = best_fit_decreasing(range(len(lengths)), lengths, budget=10)
    assert bins == [[0, 3], [1, 2, 6], [4, 5]]
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    with pytest.raises(ValueError):
        best_fit_decreasing([0], [11], budget=10)


def test_every_rank_runs_the_same_number_of_micro_batches():
    torch.manual_seed(1)  # the lengths below are drawn from the global generator
    lengths = (torch.distributions.LogNormal(4.8, 0.8).sample((400,)).clamp(2, 512)).long().tolist()
    world = 4
    plan = BatchPlan(400, 4, 2, world, seed=9, shuffle=True, lengths=lengths, pack_tokens=512)
    for step in range(plan.steps_per_epoch):
        per_rank = [plan.micro_batches(step, r) for r in range(world)]
        assert len({len(m) for m in per_rank}) == 1
        flat = sorted(i for m in per_rank for b in m for i in b)
        assert flat == sorted(plan.step_examples(step))  # each of the step's examples exactly once
        assert all(sum(lengths[i] for i in b) <= 512 for m in per_rank for b in m)
    # a rank with fewer micro-batches splits its fullest one
    assert pack_step([0, 1, 2, 3, 4], [6, 5, 2, 2, 2], world=2, budget=8) == [[[0], [3]], [[1, 2], [4]]]
    # the order is a pure function of (seed, epoch, step)
    again = BatchPlan(400, 4, 2, world, seed=9, shuffle=True, lengths=list(lengths), pack_tokens=512)
    assert [again.micro_batches(s, 1) for s in range(5)] == [plan.micro_batches(s, 1) for s in range(5)]


def test_an_empty_micro_batch_is_one_ignored_token():
    batch = collate_packed([], [], pad_id=7)
    assert batch["input_ids"].tolist() == [[7]] and batch["labels"].tolist() == [[IGNORE]]
    assert pack_step([0, 1], [8, 1], world=2, budget=8) == [[[0]], [[1]]]
    # rank 0's one example cannot be split to match rank 1's two micro-batches: it gets an empty one
    assert pack_step([0, 1, 2], [8, 5, 5], world=2, budget=8) == [[[0], []], [[1], [2]]]


def test_unpacked_micro_batches_group_similar_lengths():
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, 500, (256,), generator=g).tolist()
    grouped = BatchPlan(256, 4, 4, 2, seed=5, shuffle=True, lengths=lengths)
    plain = BatchPlan(256, 4, 4, 2, seed=5, shuffle=True)

    def padding(plan):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b)
                   for s in range(plan.steps_per_epoch) for r in range(2) for b in plan.micro_batches(s, r))

    assert padding(grouped) < 0.5 * padding(plain)
    for s in range(grouped.steps_per_epoch):  # the same examples per step, only regrouped
        ours = sorted(i for r in range(2) for b in grouped.micro_batches(s, r) for i in b)
        assert ours == sorted(i for r in range(2) for b in plain.micro_batches(s, r) for i in b)
        assert all(len(b) == 4 for r in range(2) for b in grouped.micro_batches(s, r))


@pytest.mark.parametrize(
    "recipe,args,message",
    [
        ("quickstart", ["model.attn_implementation=paged|sdpa", "data.packing=true"], "cannot keep the examples of a packed row apart"),
        ("quickstart", ["data.pack_tokens=10", "data.packing=true"], "smaller than the longest training example"),
        ("quickstart-classify", ["data.packing=true"], "`data.packing: true` with `task.type: classification`"),
    ],
)
def test_plan_refuses_packing_that_cannot_work(cache_dir, recipe, args, message):
    from launcher.errors import UserError
    from launcher.plan import make_plan
    from launcher.recipe import load_recipe

    with pytest.raises(UserError, match=re.escape(message)):
        make_plan(load_recipe(f"recipes/{recipe}.yaml", [f"data.cache_dir={cache_dir}", *args]))


def test_plan_prints_packing(cache_dir):
    from launcher.plan import format_plan, make_plan
    from launcher.recipe import load_recipe

    on = load_recipe("recipes/quickstart.yaml", [f"data.cache_dir={cache_dir}", "data.packing=true"])
    text = format_plan(make_plan(on), on)
    assert "packing      on: " in text and "at most 1024 tokens" in text  # micro 16 x max_seq_len 64
    # unset: the quickstart's rows are all about as long, so padded micro-batches waste little and it does not pack
    auto = load_recipe("recipes/quickstart.yaml", [f"data.cache_dir={cache_dir}"])
    plan = make_plan(auto)
    assert plan.unpacked_padding < 0.10 and "packing      off (data.packing unset and padded micro-batches are only" in format_plan(plan, auto)
    off = load_recipe("recipes/quickstart.yaml", [f"data.cache_dir={cache_dir}", "data.packing=false"])
    assert "packing      off (data.packing: false)" in format_plan(make_plan(off), off)


def test_example_lengths_follow_filtered_rows(tmp_path):
    from datasets import Dataset

    from launcher.data.packing import example_lengths

    ds = Dataset.from_dict({"input_ids": [[1] * n for n in (5, 1, 7, 2, 9)]})
    kept = ds.filter(lambda ids: len(ids) > 1, input_columns="input_ids", keep_in_memory=True).select([3, 0, 1], keep_in_memory=True)
    assert example_lengths(kept) == [len(x) for x in kept["input_ids"]] == [9, 5, 7]
