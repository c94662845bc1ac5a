"""Stand-ins for real model families: each family's config.json fields (as its Hub repo has them)
with the sizes scaled down, and its chat template and special tokens on the built-in tokenizer.
`weights=True` also saves random weights (safetensors), for training and export."""

from __future__ import annotations

import json
from pathlib import Path

import trl

from launcher.builtin import TOKENIZER_DIR

TEMPLATES = Path(trl.__file__).parent / "chat_templates"
# Mistral v0.3's [INST] layout (its own template folds the system prompt into the last user turn)
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
           "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
_QWEN = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>"]

FAMILIES = {
    "llama3.1": dict(
        config=dict(architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=131072, rope_theta=500000.0,
                    rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192, rope_type="llama3"),
                    rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False, num_key_value_heads=1),
        template="llama3_1.jinja", special=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>"),
    "qwen2.5": dict(
        config=dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    hidden_act="silu", sliding_window=131072, use_sliding_window=False, max_window_layers=28, tie_word_embeddings=False),
        template="qwen2_5.jinja", special=_QWEN, eos="<|im_end|>"),
    "qwen2.5-small": dict(  # the 0.5B-3B sizes tie their embeddings
        config=dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    hidden_act="silu", sliding_window=32768, use_sliding_window=False, max_window_layers=21, tie_word_embeddings=True),
        template="qwen2_5.jinja", special=_QWEN, eos="<|im_end|>"),
    "qwen3": dict(
        config=dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    hidden_act="silu", attention_bias=False, tie_word_embeddings=True),
        template="qwen3.jinja", special=_QWEN + ["<think>", "</think>"], eos="<|im_end|>"),
    "mistral": dict(
        config=dict(architectures=["MistralForCausalLM"], model_type="mistral", max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
                    hidden_act="silu", sliding_window=None, tie_word_embeddings=False, num_key_value_heads=1),
        template=MISTRAL, special=["<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>"),
    "gemma2": dict(
        config=dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6,
                    hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, sliding_window=4096, final_logit_softcapping=30.0,
                    attn_logit_softcapping=50.0, tie_word_embeddings=True),
        template="gemma.jinja", special=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>"),
    "gemma3": dict(
        config=dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", max_position_embeddings=32768, rope_theta=1000000.0,
                    rope_local_base_freq=10000.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16,
                    sliding_window=512, sliding_window_pattern=6, tie_word_embeddings=True),
        template="gemma3.jinja", special=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>"),
    "phi3": dict(
        config=dict(architectures=["Phi3ForCausalLM"], model_type="phi3", max_position_embeddings=4096, original_max_position_embeddings=4096,
                    rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu", sliding_window=2047, tie_word_embeddings=False, num_key_value_heads=4),
        template="phi3.jinja", special=["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], eos="<|endoftext|>"),
    "qwen3-moe": dict(
        config=dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", max_position_embeddings=40960, rope_theta=1000000.0,
                    rms_norm_eps=1e-6, hidden_act="silu", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                    norm_topk_prob=True, mlp_only_layers=[], tie_word_embeddings=False),
        template="qwen3.jinja", special=_QWEN + ["<think>", "</think>"], eos="<|im_end|>"),
}


def build(family: str, out: Path, weights: bool = False) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = FAMILIES[family]
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.add_tokens([t for t in spec["special"] if t not in tok.get_vocab()], special_tokens=True)
    tok.eos_token = spec["eos"]
    if spec.get("bos"):
        tok.bos_token = spec["bos"]
    template = spec["template"]
    tok.chat_template = (TEMPLATES / template).read_text() if template.endswith(".jinja") else template
    tok.save_pretrained(out)
    fields = {**_SMALL, **spec["config"], "vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
    (out / "config.json").write_text(json.dumps(fields, indent=1))
    if weights:
        config = AutoConfig.from_pretrained(out)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out
