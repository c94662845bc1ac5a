"""LoRA on every engine and `sft export`, checked the way users consume the result.

Each engine trains LoRA adapters for a few steps on 2 ranks and exports `final/` by itself.
A fresh interpreter that never imports the launcher then loads `final/` with transformers and
generates with the chat template, and loads the `--adapter-only` export with
`PeftModel.from_pretrained` onto the base: its logits must equal the merged model's. It also
loads `final/` the way vLLM and transformers 4 do (safetensors + config.json, and the head is the
embedding when the config says tie_word_embeddings): the built-in models are tied, and two of the
runs train the head (modules_to_save, or a LoRA adapter on lm_head).
"""

import json
import subprocess
import sys

import pytest
import torch.distributed.checkpoint as dcp

from conftest import REPO, run_sft

QUICKSTART = "recipes/quickstart.yaml"
ENGINES = {
    # all-linear plus an adapter on the tied lm_head: merging must not add its delta to the shared embedding.
    "ddp": ["strategy.backend=ddp", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"],
    "fsdp": ["strategy.backend=fsdp"],
    "zero2": ["strategy.backend=deepspeed", "strategy.zero_stage=2"],
    # ZeRO-3 with gradient checkpointing and a frozen base: the combination peft users trip on; and a
    # trained copy of the tied head (modules_to_save), which the export must untie.
    "zero3": ["strategy.backend=deepspeed", "strategy.zero_stage=3", "model.gradient_checkpointing=true", "lora.modules_to_save=[lm_head]"],
}

FRESH_CHECK = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
final, adapter = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(final)
merged = AutoModelForCausalLM.from_pretrained(final)
ids = tok.apply_chat_template([{"role": "user", "content": "repeat: a b c d"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = merged.generate(**ids, max_new_tokens=6, do_sample=False)
base_path = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter)
with torch.no_grad():
    a = merged(input_ids=ids["input_ids"]).logits
    b = peft_model(input_ids=ids["input_ids"]).logits
# As vLLM and transformers 4 load it: the files and config.json, and tie_word_embeddings means the head IS the embedding.
from glob import glob
from safetensors.torch import load_file
from transformers import AutoConfig
config, tensors = AutoConfig.from_pretrained(final), {}
for f in glob(final + "/*.safetensors"):
    tensors.update(load_file(f))
tied = json.load(open(final + "/config.json")).get("tie_word_embeddings", config.tie_word_embeddings)
if tied:
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
config.tie_word_embeddings = False  # load exactly these tensors
server = AutoModelForCausalLM.from_config(config)
server.load_state_dict(tensors, strict=True)
with torch.no_grad():
    c = server.eval()(input_ids=ids["input_ids"]).logits
eos = merged.generation_config.eos_token_id
print(json.dumps({"new": out.shape[1] - ids["input_ids"].shape[1], "diff": float((a - b).abs().max()),
                  "server_diff": float((c - b).abs().max()), "tied": tied,
                  "eos": eos if isinstance(eos, list) else [eos], "im_end": tok.convert_tokens_to_ids("<|im_end|>"),
                  "launcher": "launcher" in sys.modules}))
"""


def _lora_run(run_dir, cache_dir, *extra):
    return run_sft(["run", QUICKSTART, "--nproc", "2", f"output_dir={run_dir}", f"data.cache_dir={cache_dir}", "lora.enabled=true",
                    "train.lr=1e-2", "train.max_steps=4", "train.eval_generate=0", "train.eval_at_start=false",
                    "logging.every_steps=1", *extra])


def _trainable_names(ckpt):
    """The tensor names a checkpoint's model part holds (DCP metadata, or the DeepSpeed param shapes)."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state["backend"] == "deepspeed":
        import torch

        shapes = torch.load(next((ckpt / "model" / "deepspeed").glob("*model_states.pt")), weights_only=False)["param_shapes"]
        return [n for group in shapes for n in group]
    meta = dcp.FileSystemReader(str(ckpt / "model")).read_metadata()
    return [k for k in meta.state_dict_metadata if k.startswith("model.")]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_lora_trains_exports_and_serves(engine, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = _lora_run(run_dir, cache_dir, *ENGINES[engine])
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0]

    ckpt = run_dir / "checkpoints" / "step-000004"
    names = _trainable_names(ckpt)
    assert names and all("lora_" in n or "modules_to_save" in n for n in names), names[:5]  # not the frozen base

    report = json.loads((run_dir / "final" / "export.json").read_text())
    assert report["merged"] and report["step"] == 4 and report["max_abs_logit_diff"] <= report["tolerance"]
    # Checked against the logits the live model gave at save time (a collective forward under ZeRO-3 and
    # FSDP) and against the base's weight fingerprint, not only against a model rebuilt the same way.
    training = report["checked_against_training"]
    assert training["max_abs_logit_diff_rebuilt"] <= training["tolerance"], training
    assert training["max_abs_logit_diff_exported"] <= training["tolerance_exported"], training
    assert report["base_weights"] == "matches the checkpoint's fingerprint"
    assert not list((run_dir / "final").glob("adapter_*"))  # merged: a plain transformers model

    adapter = tmp_path / "adapter"
    exported = run_sft(["export", str(run_dir), "--out", str(adapter), "--adapter-only"])
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "FutureWarning" not in exported.stderr, exported.stderr[-3000:]  # peft's, when it loads the adapter back
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()

    fresh = subprocess.run([sys.executable, "-c", FRESH_CHECK, str(run_dir / "final"), str(adapter)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    result = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert result["new"] >= 1 and not result["launcher"]
    assert result["im_end"] in result["eos"]
    assert result["diff"] < 1e-4, result  # the adapter on its base equals the merged model
    assert result["server_diff"] < 1e-4, result  # and so does what a server that re-ties loads
    trains_head = any("lm_head" in o for o in ENGINES[engine])
    assert result["tied"] is not trains_head  # untied only when the head was trained


@pytest.fixture(scope="module")
def lora_ddp_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    proc = _lora_run(run_dir, cache_dir, "checkpoint.every_steps=1", "checkpoint.keep_last=2", "export.on_finish=false",
                     "lora.target_modules=[q_proj,v_proj]", "lora.use_rslora=true", "lora.use_dora=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_rotation_keeps_the_newest_complete_checkpoints(lora_ddp_run):
    root = lora_ddp_run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000003", "step-000004"]
    assert (root / "latest").read_text().strip() == "step-000004"
    assert not (lora_ddp_run / "final").exists()  # export.on_finish=false
    names = _trainable_names(root / "step-000004")
    assert any("lora_magnitude" in n for n in names)  # DoRA's magnitude vectors are trained and saved
    assert not any("k_proj.lora" in n for n in names)  # only the named target modules


def test_export_sharded_and_16_bit(lora_ddp_run, tmp_path):
    out = tmp_path / "bf16"
    proc = run_sft(["export", str(lora_ddp_run / "checkpoints" / "step-000003"), "--out", str(out),
                    "export.dtype=bfloat16", "export.max_shard_size=1MB"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]  # DCP's one-process warning was printed by every export
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    report = json.loads((out / "export.json").read_text())
    assert report["dtype"] == "bfloat16" and report["step"] == 3 and report["merged"]
    from safetensors import safe_open

    with safe_open(str(shards[0]), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())


def _copy_checkpoint(run_dir, to):
    import shutil

    shutil.copytree(run_dir / "checkpoints" / "step-000004", to)
    return to


def _base_with_another_seed(cache_dir, out):
    """The built-in tiny Llama's config and tokenizer with weights drawn from another seed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from launcher import builtin

    original = builtin.materialize("builtin:tiny-llama", cache_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(original)).save_pretrained(out)
    AutoTokenizer.from_pretrained(original).save_pretrained(out)
    return out


def _drop_fingerprint(ckpt):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = ckpt / "verify_reference.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = {**f.metadata(), "base_fingerprint": ""}
    save_file(load_file(path), str(path), metadata=metadata)
    (ckpt / "MANIFEST.json").unlink()  # as a checkpoint from before fingerprints: it had no manifest either


def test_export_of_a_checkpoint_without_verify_reference(lora_ddp_run, tmp_path):
    """Checkpoints written before verify_reference.safetensors existed still export, with a note in export.json."""
    source = _copy_checkpoint(lora_ddp_run, tmp_path / "step-000004")
    (source / "verify_reference.safetensors").unlink()
    (source / "MANIFEST.json").unlink()  # such checkpoints had no manifest either (else the missing file reads as damage)
    proc = run_sft(["export", str(source), "--out", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert "older version" in report["checked_against_training"]["note"] and "architecture checked only" in report["base_weights"]
    assert report["max_abs_logit_diff"] <= report["tolerance"]


@pytest.mark.parametrize(
    "case,message",
    [
        ("no_checkpoint", "has no complete checkpoint"),
        ("incomplete", "is an incomplete checkpoint"),
        ("out_not_empty", "already exists and is not empty"),
        ("base_missing", "is not a directory"),
        ("other_base", "is not the one LoRA checkpoint"),
        # The same architecture with other weights: caught by the base fingerprint, and, for a checkpoint
        # without one, by the logits the live model gave at save time.
        ("other_seed_base", "its weights differ"),
        ("other_seed_base_no_fingerprint", "does not give the logits the trained model gave when the checkpoint was saved"),
        ("tolerance", "export check failed"),
    ],
)
def test_export_refuses_bad_input(case, message, lora_ddp_run, tmp_path, cache_dir):
    source, out, extra = lora_ddp_run, tmp_path / "out", []
    if case == "no_checkpoint":
        source = tmp_path / "empty-run"
        source.mkdir()
    elif case == "incomplete":
        source = _copy_checkpoint(lora_ddp_run, tmp_path / "step-000009")
        (source / "COMPLETE").unlink()
    elif case == "out_not_empty":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    elif case == "base_missing":
        extra = [f"model.path={tmp_path / 'moved-away'}"]
    elif case == "other_base":
        extra = ["model.path=builtin:tiny-qwen2"]
    elif case.startswith("other_seed_base"):
        other = _base_with_another_seed(cache_dir, tmp_path / "other-seed")
        extra = [f"model.path={other}"]
        if case.endswith("no_fingerprint"):
            source = _copy_checkpoint(lora_ddp_run, tmp_path / "step-000004")
            _drop_fingerprint(source)
    elif case == "tolerance":
        extra = ["export.dtype=bfloat16", "export.verify_tolerance=0"]
    proc = run_sft(["export", str(source), "--out", str(out), *extra])
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if case.startswith("other_seed_base"):  # names the base and the checkpoint
        assert str(other) in proc.stderr and "step-000004" in proc.stderr, proc.stderr[-3000:]
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out-*"))  # no temporary directory left behind


def test_add_lora_is_quiet(cache_dir):
    """peft reading transformers' deprecated is_gradient_checkpointing printed a FutureWarning in every plan and rank."""
    import warnings

    from transformers import AutoModelForCausalLM

    from launcher import builtin
    from launcher.model import add_lora
    from launcher.recipe import LoraConfig

    model = AutoModelForCausalLM.from_pretrained(builtin.materialize("builtin:tiny-llama", cache_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_lora(model, LoraConfig(enabled=True))
    assert not [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_lora_settings_are_checked_before_training(cache_dir, tmp_path):
    proc = run_sft(["plan", QUICKSTART, f"data.cache_dir={cache_dir}", "lora.enabled=true", "lora.target_modules=[qkv_proj]"])
    assert proc.returncode == 2 and "q_proj" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


ZERO0_SAVE = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from launcher import builtin
from launcher.dist import Dist
from launcher.engines.deepspeed import DeepSpeedEngine
from launcher.model import load_model
from launcher.recipe import load_recipe

out, cache = Path(sys.argv[1]), Path(sys.argv[2])
recipe = load_recipe("recipes/quickstart.yaml", ["strategy.backend=deepspeed", "strategy.zero_stage=0", "model.dtype=bfloat16"])
model = load_model(builtin.materialize("builtin:tiny-llama", cache), recipe.model, torch.bfloat16, torch.device("cpu"))
engine = DeepSpeedEngine.create(model, recipe, Dist(), 1)
ids = torch.tensor([[5, 6, 7, 8]])
engine.backward(engine.model(input_ids=ids, labels=ids).loss.float())
engine.clip_and_step(1.0)
engine.save_checkpoint(out / "model")
(out / "trainer_state.json").write_text(json.dumps({"backend": "deepspeed", "zero_stage": 0}))
save_file({"q": model.model.layers[0].self_attn.q_proj.weight.detach().float().clone()}, str(out / "expected.safetensors"))
"""


def test_zero0_checkpoint_is_read_without_unpickling_code(tmp_path, cache_dir):
    """Export reads DeepSpeed's ZeRO-0 file (module, optimizer state of DeepSpeed's 16-bit wrapper, shapes,
    config) with torch.load(weights_only=True); a file that holds code is refused and the code never runs."""
    import os

    import torch
    from safetensors.torch import load_file

    from launcher import builtin, checkpoint_weights
    from launcher.errors import UserError
    from launcher.model import load_model
    from launcher.recipe import load_recipe

    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, "-c", ZERO0_SAVE, str(ckpt), str(cache_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = load_recipe(QUICKSTART, [])
    model = load_model(builtin.materialize("builtin:tiny-llama", cache_dir), recipe.model, torch.float32, torch.device("cpu"))
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert checkpoint_weights.load_weights(ckpt, model) > 0
    loaded, expected = model.model.layers[0].self_attn.q_proj.weight, load_file(ckpt / "expected.safetensors")["q"]
    assert torch.equal(loaded, expected) and not torch.equal(loaded, before)

    class RunsCode:
        def __reduce__(self):
            return exec, (f"open({str(tmp_path / 'ran')!r}, 'w').write('code from the checkpoint ran')",)

    torch.save({"module": RunsCode()}, ckpt / "model" / "deepspeed" / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="holds Python objects other than tensors"):
        checkpoint_weights.load_weights(ckpt, model)
    assert not (tmp_path / "ran").exists()


def test_base_fingerprint_follows_the_weights_not_the_files(cache_dir, tmp_path):
    """The same weights re-sharded or stored in bf16 keep the fingerprint; another seed changes it."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher import builtin, verify

    original = builtin.materialize("builtin:tiny-llama", cache_dir)
    model = AutoModelForCausalLM.from_pretrained(original)
    model.save_pretrained(tmp_path / "resharded", max_shard_size="300KB")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert len(list((tmp_path / "resharded").glob("*.safetensors"))) > 1
    other = _base_with_another_seed(cache_dir, tmp_path / "other-seed")
    found = [verify.fingerprint(p) for p in (original, tmp_path / "resharded", tmp_path / "bf16", other)]
    assert found[0] and found[0] == found[1] == found[2] != found[3]
