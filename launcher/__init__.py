"""sft-launcher: fine-tune causal LLMs from one YAML recipe."""

__version__ = "0.1.0"
