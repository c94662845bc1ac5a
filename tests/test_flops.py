"""MFU arithmetic: the FLOPs per token and the peak lookup (the GPU path itself runs only on a GPU)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launcher.flops import MFU, flops_per_token, matmul_params, peak_flops


def _model(tied):
    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def test_matmul_params_leave_out_an_untied_input_embedding():
    untied, tied = _model(False), _model(True)
    total = sum(p.numel() for p in untied.parameters())
    assert matmul_params(untied) == total - 100 * 16
    assert matmul_params(tied) == sum(p.numel() for p in tied.parameters())  # the tied matrix is the output head


def test_flops_per_token_and_peaks():
    assert flops_per_token(1_000, layers=2, hidden=16, seq_len=10) == 6_000 + 12 * 2 * 16 * 10
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("some CPU") is None


def test_mfu_is_none_on_cpu():
    assert MFU(_model(True), torch.device("cpu"))(tokens=100, sequences=4, seconds=1.0, world_size=1) is None
