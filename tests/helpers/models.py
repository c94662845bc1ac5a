"""A built-in tiny model whose greedy decodes differ per prompt (the built-ins' small random
initialisation decodes one token forever), for tests that must tell rows apart."""

import torch


def scrambled(name: str, cache_dir, out=None):
    """(model, tokenizer) of builtin:NAME with N(0, 0.1) matrices; saved to `out` when given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher import builtin

    path = builtin.materialize(f"builtin:{name}", cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if out is not None:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return model, tok


def chat_prompt(tok, messages) -> list:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]
