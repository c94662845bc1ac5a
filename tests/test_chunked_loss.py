"""Chunked cross-entropy (train.loss_chunk_tokens): the same loss and gradients as full logits."""

import pytest
import torch

from launcher.data.batches import pad_collate
from launcher.data.packing import collate_packed
from launcher.data.tokenize import IGNORE
from launcher.train import token_loss_sum


@pytest.fixture(scope="module")
def tiny(cache_dir):
    from launcher.builtin import materialize

    return materialize("builtin:tiny-llama", cache_dir)


def _rows():
    g = torch.Generator().manual_seed(4)
    rows = []
    for n in (23, 9, 40):
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        rows.append((ids, [IGNORE if i < 4 else t for i, t in enumerate(ids)]))
    return rows


def _model(path, lora=False, packing=False):
    from launcher.model import add_lora, load_model
    from launcher.recipe import LoraConfig, ModelConfig

    torch.manual_seed(0)
    model = load_model(path, ModelConfig(path=str(path)), torch.float32, torch.device("cpu"), packing=packing)
    if lora:
        torch.manual_seed(1)
        model = add_lora(model, LoraConfig(enabled=True, r=4, dropout=0.0, modules_to_save=["lm_head"]))
    return model


def _loss_and_grads(model, batch, chunk):
    model.zero_grad()
    loss = token_loss_sum(model, batch, chunk)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["padded", "packed", "lora"])
def test_chunked_cross_entropy_equals_full_logits(tiny, layout):
    rows = _rows()
    ids, labels = [r[0] for r in rows], [r[1] for r in rows]
    if layout == "packed":
        batch, model = collate_packed(ids, labels, 0), _model(tiny, packing=True)
    else:
        batch, model = pad_collate(ids, labels, 0), _model(tiny, lora=layout == "lora")
    full, g_full = _loss_and_grads(model, batch, 0)
    chunked, g_chunked = _loss_and_grads(model, batch, 7)  # 7 does not divide the target count
    assert chunked.dim() == 0 and float(chunked) == pytest.approx(float(full), rel=1e-6)
    assert g_full.keys() == g_chunked.keys() and g_full
    for name in g_full:
        diff = (g_full[name] - g_chunked[name]).abs().max().item()
        assert diff <= 1e-5 * max(1.0, g_full[name].abs().max().item()), (name, diff)
    # the head's class forward is back after the call
    head = model.get_output_embeddings()
    assert "forward" not in head.__dict__


def test_a_model_that_rescales_its_logits_is_refused(tiny):
    model = _model(tiny)
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, out: out * 2.0)  # as a logit scale after the head would
    rows = _rows()
    batch = pad_collate([r[0] for r in rows], [r[1] for r in rows], 0)
    with pytest.raises(RuntimeError, match="train.loss_chunk_tokens=0"):
        token_loss_sum(model, batch, 8)
