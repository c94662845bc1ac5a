"""`sft export`: a checkpoint becomes a Hugging Face model directory that transformers, peft and
vLLM load as they are, checked against the model as it was trained.

The flow, on CPU and in one process: rebuild the training-time model from the checkpoint (the
base plus LoRA adapters, or the full weights consolidated from the engine's shards), take its
logits on a few stored prompts and check them against the logits the live model gave at save time
(launcher/verify.py; for LoRA, the base's weight fingerprint first), merge the adapters (or keep
them apart with --adapter-only), cast to `export.dtype`, save to a temporary directory, reload that
directory the way a server would, compare logits, and only then move it to `--out`. Peak memory is
about one copy of the model.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError  # safetensors' write errors (a full disk) are not OSError
from transformers import GenerationConfig

from launcher import checkpoint, checkpoint_integrity, checkpoint_weights, verify
from launcher.errors import UserError
from launcher.model import DTYPES, add_lora, load_model, load_tokenizer, materialize, quiet_peft


def end_of_turn_ids(tokenizer, model_config) -> list:
    """The ids generation should stop at: the model's EOS ids plus the chat template's end-of-turn token."""
    from launcher.data.tokenize import tokenize_conversation

    ids = model_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if tokenizer.chat_template:
        sample = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        enc = tokenize_conversation(tokenizer, sample)
        ids.append(enc["input_ids"][enc["reply_end"] - 1])
    return sorted(set(ids))


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty. Nothing was written; choose a new directory or empty it first.")


def _check_base(base: Path, hf: Path, ckpt: Path, recorded: Optional[dict]) -> str:
    """A LoRA checkpoint needs the base it was trained on: same architecture, and the same weights
    when the checkpoint recorded their fingerprint. Returns what was checked, for export.json."""
    if not (base / "config.json").is_file():
        raise UserError(
            f"the base model of LoRA checkpoint {ckpt} is missing: {base} has no config.json. Put the base model "
            "back at that path (or pass model.path=DIR to `sft export` to name where it is now)."
        )
    diff = checkpoint_weights.model_differences(hf, base)
    if diff:
        raise UserError(
            f"the base model at {base} is not the one LoRA checkpoint {ckpt} was trained on: {diff[0]}. Point model.path at the original base."
        )
    if recorded is None or not recorded["base_fingerprint"]:
        return "not recorded in the checkpoint (written by an older version, or a base without safetensors files): architecture checked only"
    found = verify.fingerprint(base)
    if found != recorded["base_fingerprint"]:
        raise UserError(
            f"the base model at {base} is not the one LoRA checkpoint {ckpt} was trained on: its weights differ (fingerprint "
            f"{found or 'none: it has no safetensors files'}, the checkpoint recorded {recorded['base_fingerprint']}), although the "
            "architecture is the same (another seed, an Instruct or updated copy?). Adapters merged onto other weights make another "
            "model, so nothing was written. Point model.path at the base training used "
            f"({recorded['base_model']}, or a copy of it)."
        )
    return "matches the checkpoint's fingerprint"


def trained_model(ckpt: Path, recipe, state: dict, base: Path, pad_token_id) -> torch.nn.Module:
    """The model as trained, on CPU: base (training dtype) + fp32 adapters, or full weights in fp32."""
    hf = ckpt / "hf"
    head = dict(sequence_labels=state.get("sequence_labels"), pad_token_id=pad_token_id)
    if state["lora"]:
        model = add_lora(load_model(base, recipe.model, DTYPES[state["train_dtype"]], torch.device("cpu"), **head), recipe.lora)
    else:
        # Weights come from the checkpoint: build an empty skeleton from its config, in fp32 (the master copy).
        model = load_model(hf, recipe.model, torch.float32, torch.device("cpu"), weights=False, **head)
        materialize(model, torch.device("cpu"))
    checkpoint_weights.load_weights(ckpt, model)
    if not state["lora"]:
        model.tie_weights()
    return model.eval()


@torch.no_grad()
def logits(model, prompts: Sequence[Sequence[int]]) -> list:
    return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in prompts]


def _tolerance(recipe, dtype: torch.dtype, reference: list) -> float:
    if recipe.export.verify_tolerance is not None:
        return recipe.export.verify_tolerance
    if dtype == torch.float32:
        return 1e-3
    return 0.05 * max(float(r.abs().max()) for r in reference)  # 16-bit rounding of every weight


def _check_training(recipe, train_dtype: torch.dtype, recorded: Optional[dict], reference: list, ckpt: Path, base: Path, lora: bool) -> dict:
    """The rebuilt model must give the logits the live model gave when the checkpoint was saved."""
    if recorded is None:
        return {"note": f"{ckpt} has no {verify.FILE} (written by an older version): checked against the rebuilt model only"}
    live_max = max(float(x.abs().max()) for x in recorded["logits"])
    # Training ran in its own dtype, kernels and sharding: fp32 agrees to rounding, 16-bit to its precision.
    auto = 1e-3 * max(1.0, live_max) if train_dtype == torch.float32 else 0.05 * live_max
    tolerance = max(auto, recipe.export.verify_tolerance or 0.0)
    diff = verify.max_difference(recorded, reference)
    if not diff <= tolerance:
        what = f"the base at {base} plus its adapters" if lora else "the weights consolidated from its shards"
        raise UserError(
            f"export check failed: the model rebuilt from checkpoint {ckpt} ({what}) does not give the logits the trained model gave "
            f"when the checkpoint was saved (largest difference {diff:.3g}, tolerance {tolerance:.3g}). "
            + ("The base is probably not the one training used: point model.path at it. " if lora else "The checkpoint's shards may be damaged. ")
            + "Nothing was written."
        )
    return {"max_abs_logit_diff_rebuilt": diff, "tolerance": tolerance}


def _untie_adapted_layers(model) -> None:
    """An adapter on a tied layer (LoRA on lm_head, or on embed_tokens, of a tie_word_embeddings model)
    changed only that layer's output in training; merging would add its delta to the tensor both
    layers share. Give the adapted layer its own copy first."""
    from collections import Counter

    from peft.tuners.tuners_utils import BaseTunerLayer

    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for module in model.modules():
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else None
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and uses[id(weight)] > 1:
            base.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)


def _settle_tie(model) -> None:
    """A config that says tie_word_embeddings makes vLLM and transformers 4 use the embedding as the
    head and drop the head's tensor. Keep that only when the head is the embedding (or equal to it);
    otherwise untie in the config (and its text config) so both tensors are written and used."""
    text = model.config.get_text_config(decoder=True)
    configs = {id(c): c for c in (model.config, text) if getattr(c, "tie_word_embeddings", False)}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if not configs or head is None or embedding is None or head.weight is embedding.weight:
        return
    if head.weight.shape == embedding.weight.shape and torch.equal(head.weight, embedding.weight):
        head.weight = embedding.weight  # equal on purpose: stay tied, one tensor
        return
    for config in configs.values():
        config.tie_word_embeddings = False


def _save_merged(model, lora: bool, dtype: torch.dtype, tokenizer, hf: Path, tmp: Path, max_shard_size: str):
    if lora:
        import warnings

        _untie_adapted_layers(model)
        with warnings.catch_warnings():  # peft's advice on tied layers is what _untie_adapted_layers and _settle_tie do
            warnings.filterwarnings("ignore", message=r".*(tie_word_embeddings|no longer tied)")
            model = model.merge_and_unload()
    _settle_tie(model)
    model = model.to(dtype)
    model.config.use_cache = True  # turned off for training; serving wants it
    if model.can_generate():  # a sequence classifier does not generate
        generation = GenerationConfig.from_pretrained(hf) if (hf / "generation_config.json").is_file() else GenerationConfig()
        generation.eos_token_id = end_of_turn_ids(tokenizer, model.config)
        generation.pad_token_id = tokenizer.pad_token_id
        model.generation_config = generation
    model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def _save_adapter(model, dtype: torch.dtype, base: Path, tmp: Path) -> int:
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    model.peft_config["default"].base_model_name_or_path = str(base)  # where servers find the base
    model.save_pretrained(tmp, safe_serialization=True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _reload(tmp: Path, adapter_only: bool, base: Path, dtype: torch.dtype, train_dtype: torch.dtype, trust_remote_code: bool,
            sequence_labels, pad_token_id):
    """Load the written directory as a server would: plain transformers, or base + PeftModel."""
    from launcher.model import head_config, model_class

    cls = model_class(sequence_labels)
    if not adapter_only:
        model = cls.from_pretrained(tmp, dtype=dtype, trust_remote_code=trust_remote_code).eval()
        # transformers 5 keeps a head whose tensor differs from a tied embedding; vLLM and transformers 4
        # re-tie it. Check what they would serve.
        tied = any(getattr(c, "tie_word_embeddings", False) for c in (model.config, model.config.get_text_config(decoder=True)))
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        if tied and head is not None and embedding is not None and head.weight.shape == embedding.weight.shape:
            head.weight = embedding.weight
        return model
    from peft import PeftModel

    base_model = cls.from_pretrained(base, dtype=train_dtype, trust_remote_code=trust_remote_code, **head_config(sequence_labels, pad_token_id))
    with quiet_peft():
        return PeftModel.from_pretrained(base_model, tmp).eval()


def export(source: Path, out: Path, adapter_only: bool = False, overrides: Optional[Sequence[str]] = None, replace_earlier_export: bool = False) -> dict:
    """Export a run dir's latest checkpoint (or the checkpoint named) to `out`. Returns export.json's content.
    `replace_earlier_export`: `out` may hold an earlier export (a run trained further replaces its final/)."""
    from launcher.recipe import load_recipe

    out = Path(out)
    ckpt = checkpoint.resolve(Path(source))
    broken = checkpoint_integrity.damage(ckpt)
    if broken:
        prev = checkpoint_integrity.previous_intact(ckpt)
        offer = f"The previous checkpoint {prev} is intact: sft export {prev} --out {out}." if prev else "This run has no intact earlier checkpoint."
        raise UserError(f"checkpoint {ckpt} is damaged: {'; '.join(broken[:3])}. Nothing was written. {offer}")
    earlier = replace_earlier_export and (out / "export.json").is_file()
    if not earlier:
        _check_out(out)
    state = checkpoint.read_state(ckpt)
    recipe = load_recipe(ckpt / "recipe.yaml", list(overrides or []))
    if adapter_only and not state["lora"]:
        raise UserError(f"--adapter-only: checkpoint {ckpt} is from a full fine-tuning run (lora.enabled was false); it has no adapter. Export without --adapter-only.")
    # model.path=... on the command line names where the base lives now; otherwise it is where training found it.
    base = Path(state["base_model"])
    if any(o.startswith("model.path=") for o in overrides or []):
        from launcher.cache import cache_root
        from launcher.model import model_dir

        base = model_dir(recipe.model, cache_root(recipe.data.cache_dir)).resolve()
    train_dtype = DTYPES[state["train_dtype"]]
    dtype = train_dtype if recipe.export.dtype == "auto" else DTYPES[recipe.export.dtype]
    tokenizer = load_tokenizer(ckpt / "hf", recipe.model)
    prompts = json.loads((ckpt / "verify_prompts.json").read_text())

    recorded = verify.read(ckpt)
    base_check = _check_base(base, ckpt / "hf", ckpt, recorded) if state["lora"] else None
    model = trained_model(ckpt, recipe, state, base, tokenizer.pad_token_id)
    reference = logits(model, prompts)
    training = _check_training(recipe, train_dtype, recorded, reference, ckpt, base, state["lora"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a server running as another user must read it
    try:
        if adapter_only:
            params = _save_adapter(model, dtype, base, tmp)
        else:
            params = _save_merged(model, state["lora"], dtype, tokenizer, ckpt / "hf", tmp, recipe.export.max_shard_size)
        tokenizer.save_pretrained(tmp)
        del model
        gc.collect()
        if (ckpt / "classification.json").is_file():  # the label set (and the lm head's prompt) for serving
            shutil.copyfile(ckpt / "classification.json", tmp / "classification.json")
        exported = _reload(tmp, adapter_only, base, dtype, train_dtype, recipe.model.trust_remote_code, state.get("sequence_labels"),
                           tokenizer.pad_token_id)
        served = logits(exported, prompts)
        diff = max(float((a - b).abs().max()) for a, b in zip(served, reference))
        del exported
        tolerance = _tolerance(recipe, dtype, reference)
        if recorded is not None:  # the export against the live model directly, not only through the rebuild
            training["max_abs_logit_diff_exported"] = verify.max_difference(recorded, served)
            training["tolerance_exported"] = training["tolerance"] + tolerance
        report = {
            "source_checkpoint": str(ckpt.resolve()),
            "step": state["step"],
            "merged": bool(state["lora"] and not adapter_only),
            "adapter_only": adapter_only,
            "dtype": str(dtype).removeprefix("torch."),
            "parameters": params,
            "max_abs_logit_diff": diff,
            "tolerance": tolerance,
            "verify_prompts": len(prompts),
            "checked_against_training": training,
        }
        if base_check is not None:
            report["base_weights"] = base_check
        checks = [(diff, tolerance, "the trained model's (rebuilt from the checkpoint)")]
        if recorded is not None:
            checks.append((training["max_abs_logit_diff_exported"], training["tolerance_exported"], "the live model's at save time"))
        for found, allowed, whose in checks:
            if not found <= allowed:
                raise UserError(
                    f"export check failed: the exported model's logits differ from {whose} by {found:.3g} "
                    f"(tolerance {allowed:.3g}, dtype {report['dtype']}). Nothing was written to {out}. Try export.dtype=float32, "
                    "or raise export.verify_tolerance if the difference is expected."
                )
        (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
        if earlier:
            old = out.parent / f".{out.name}-replaced"
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            if out.exists():
                out.rmdir()  # empty (checked above)
            tmp.rename(out)
    except (OSError, SafetensorError) as e:  # a full disk, a quota, permissions: what was written goes, --out stays as it was
        free = shutil.disk_usage(out.parent).free / 2**30
        raise UserError(f"writing the export failed ({type(e).__name__}: {e}; {free:.1f} GiB free under {out.parent}). "
                        f"{out} was not touched and the partial copy was removed. Free space and run the same command again.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
