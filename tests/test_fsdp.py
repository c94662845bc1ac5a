"""FSDP2 with real ranks (2 gloo processes on CPU): same training as DDP, rank-0 loading, clear errors.

That FSDP really shards is measured with the other engines in tests/test_sharding.py."""

import json

import pytest
import torch

from conftest import REPO, run_sft

QUICKSTART = "recipes/quickstart.yaml"


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """The same 2-rank run under ddp and fsdp: 6 steps, eval (with generation) every 3, export."""
    out = {}
    for backend in ("ddp", "fsdp"):
        run_dir = tmp_path_factory.mktemp(backend) / "run"
        proc = run_sft(["run", QUICKSTART, "--nproc", "2", f"output_dir={run_dir}", f"data.cache_dir={cache_dir}",
                        "train.max_steps=6", "train.eval_every=3", "train.eval_generate=2", "logging.every_steps=1",
                        "export.on_finish=true", f"strategy.backend={backend}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[backend] = run_dir
    return out


def test_fsdp_losses_match_ddp(runs):
    ddp, fsdp = (_metrics(runs[b]) for b in ("ddp", "fsdp"))
    assert [sorted(r) for r in ddp] == [sorted(r) for r in fsdp]  # same rows: steps, evals at 0, 3, 6
    ddp_loss = [r["loss"] for r in ddp if "loss" in r]
    fsdp_loss = [r["loss"] for r in fsdp if "loss" in r]
    assert len(ddp_loss) == 6 and fsdp_loss[-1] < fsdp_loss[0]
    worst = max(abs(a - b) / abs(a) for a, b in zip(ddp_loss, fsdp_loss))
    assert worst < 1e-4, f"per-step loss differs from ddp by {worst:.2e} (relative)"
    for a, b in zip([r for r in ddp if "eval_loss" in r], [r for r in fsdp if "eval_loss" in r]):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
        assert a["eval_exact_match"] == b["eval_exact_match"]  # generation ran on both ranks without hanging


def test_fsdp_export_loads_and_matches_ddp(runs):
    from transformers import AutoModelForCausalLM

    models = {b: AutoModelForCausalLM.from_pretrained(runs[b] / "final") for b in runs}
    fsdp_final = runs["fsdp"] / "final"
    assert (fsdp_final / "model.safetensors").is_file() and not list(fsdp_final.glob("*.bin"))
    # The tied lm_head is saved once, as for the plain model, and is tied again on load.
    from safetensors.torch import load_file

    assert sorted(load_file(fsdp_final / "model.safetensors")) == sorted(load_file(runs["ddp"] / "final" / "model.safetensors"))
    m = models["fsdp"]
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    # Full fine-tuning keeps the tie (one parameter in training), so the export stays tied for servers too,
    # and it matches the logits the live, sharded model gave at save time.
    assert json.loads((fsdp_final / "config.json").read_text())["tie_word_embeddings"] is True
    training = json.loads((fsdp_final / "export.json").read_text())["checked_against_training"]
    assert training["max_abs_logit_diff_rebuilt"] <= training["tolerance"] and training["max_abs_logit_diff_exported"] <= training["tolerance_exported"]
    ddp_params = dict(models["ddp"].named_parameters())
    worst = max((p - ddp_params[n]).abs().max().item() for n, p in m.named_parameters())
    assert worst < 1e-4, f"final weights differ from ddp by {worst:.2e}"


def test_unknown_wrap_class_is_a_user_error(tmp_path, cache_dir):
    proc = run_sft(["run", QUICKSTART, "--nproc", "2", f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}",
                    "train.max_steps=1", "strategy.backend=fsdp", "strategy.fsdp_wrap=[NoSuchLayer]"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "NoSuchLayer" in proc.stderr and "LlamaDecoderLayer" in proc.stderr and "Traceback" not in proc.stderr


def test_check_wrap_classes_works_on_a_config(cache_dir):
    """What `sft plan` can call: no weights are loaded, a meta model is enough."""
    from transformers import AutoConfig

    from launcher.builtin import materialize
    from launcher.engines.fsdp import check_wrap_classes
    from launcher.errors import UserError
    from launcher.recipe import load_recipe

    recipe = load_recipe(REPO / QUICKSTART, ["strategy.backend=fsdp"])
    config = AutoConfig.from_pretrained(materialize(recipe.model.path, cache_dir))
    assert check_wrap_classes(config, recipe) == ["LlamaDecoderLayer"]  # the default: _no_split_modules
    recipe.strategy.fsdp_wrap = ["LlamaDecoderLayer", "NoSuchLayer"]
    with pytest.raises(UserError, match="no module class NoSuchLayer. Its block classes are: LlamaDecoderLayer"):
        check_wrap_classes(config, recipe)


def test_other_ranks_load_a_weightless_skeleton(cache_dir):
    """Ranks other than 0 build the model on the meta device (no host copy); buffers stay real, ties kept."""
    from launcher.builtin import materialize
    from launcher.model import load_model
    from launcher.recipe import ModelConfig

    cfg = ModelConfig(path="builtin:tiny-llama")
    path = materialize(cfg.path, cache_dir)
    skeleton = load_model(path, cfg, torch.float32, torch.device("cpu"), weights=False)
    full = load_model(path, cfg, torch.float32, torch.device("cpu"))
    assert all(p.is_meta for p in skeleton.parameters())
    assert [n for n, _ in skeleton.named_parameters()] == [n for n, _ in full.named_parameters()]
    for (name, b), (_, ref) in zip(skeleton.named_buffers(), full.named_buffers()):
        assert not b.is_meta and torch.equal(b, ref), name
