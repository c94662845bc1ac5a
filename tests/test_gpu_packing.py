"""Packing and chunked cross-entropy on CUDA (`pytest -m gpu`; skipped without a GPU).

A packed row gives every example the loss it gets alone: with sft_sdpa (fp32, tight) and with
transformers' varlen flash-attention path (bf16, where a flash-attention package or a
kernels-hub kernel is installed), and the gradients agree too. Chunked cross-entropy at a large
vocabulary uses less peak GPU memory than full logits, for the same loss.
"""

import pytest
import torch

from launcher.data.packing import PACKED_KEYS, collate_packed
from launcher.data.tokenize import IGNORE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LENGTHS = [300, 17, 640, 90, 5, 211]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from launcher.builtin import materialize

    return materialize("builtin:tiny-llama", tmp_path_factory.mktemp("gpu-cache"))


def _rows():
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in LENGTHS:
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        rows.append((ids, [IGNORE if i < n // 4 else t for i, t in enumerate(ids)]))
    return rows


def _model(path, attn, packing, dtype):
    from launcher.model import load_model
    from launcher.recipe import ModelConfig

    return load_model(path, ModelConfig(path=str(path), attn_implementation=attn), dtype, torch.device("cuda"), packing=packing)


def _per_token(logits, labels):
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE, reduction="none")


def _packed(model, rows):
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate_packed([r[0] for r in rows], [r[1] for r in rows], 0).items()}
    tok = _per_token(model(**{k: batch[k] for k in PACKED_KEYS}).logits, batch["labels"])
    b = batch["cu_seq_lens_q"].tolist()
    return torch.stack([tok[s : e - 1].sum() for s, e in zip(b[:-1], b[1:])])


def _alone(model, rows):
    return torch.stack([_per_token(model(input_ids=torch.tensor([ids], device="cuda")).logits, torch.tensor([labels], device="cuda")).sum()
                        for ids, labels in rows])


def _grads(model, losses):
    model.zero_grad()
    losses.sum().backward()
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def _flash_available() -> str:
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        pass
    try:
        import kernels  # noqa: F401

        return "kernels-community/flash-attn2"
    except ImportError:
        return ""


def test_sdpa_packed_rows_match_one_by_one_on_cuda(tiny):
    rows = _rows()
    packed_model, reference = _model(tiny, "sdpa", True, torch.float32), _model(tiny, "sdpa", False, torch.float32)
    packed, alone = _packed(packed_model, rows), _alone(reference, rows)
    assert torch.allclose(packed, alone, rtol=1e-4, atol=1e-4), (packed, alone)
    g_p, g_a = _grads(packed_model, packed), _grads(reference, alone)
    assert (g_p - g_a).abs().max() <= 1e-4 * max(1.0, g_a.abs().max().item())


def test_flash_varlen_packed_rows_match_one_by_one(tiny):
    attn = _flash_available()
    if not attn:
        pytest.skip("no flash-attention package or kernels-hub client installed")
    rows = _rows()
    model = _model(tiny, attn, True, torch.bfloat16)
    assert model.config._attn_implementation == attn  # kept: transformers' varlen path reads cu_seq_lens
    packed, alone = _packed(model, rows), _alone(model, rows)
    # bf16: per-example sums of hundreds of token losses agree to bf16 rounding, not to 1e-5
    assert torch.allclose(packed, alone, rtol=2e-2, atol=2e-2), (packed, alone)
    g_p, g_a = _grads(model, packed), _grads(model, alone)
    assert (g_p - g_a).abs().max() <= 5e-2 * max(1.0, g_a.abs().max().item())


def test_chunked_cross_entropy_saves_gpu_memory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.train import token_loss_sum

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128256, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).cuda()
    ids = torch.randint(0, config.vocab_size, (1, 8192), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    peaks, losses = {}, {}
    for chunk in (0, 1024):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = token_loss_sum(model, batch, chunk)
        loss.backward()
        torch.cuda.synchronize()
        peaks[chunk], losses[chunk] = torch.cuda.max_memory_allocated() - base, float(loss)
    print({k: f"{v / 2**30:.2f} GiB" for k, v in peaks.items()})
    assert losses[1024] == pytest.approx(losses[0], rel=1e-4)
    assert peaks[1024] < 0.5 * peaks[0]  # full logits alone are 8192 x 128256 x 4 bytes = 3.9 GiB
