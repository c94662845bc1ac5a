"""Models by Hub id, served to the real huggingface_hub client by a Hub on 127.0.0.1 (helpers/fake_hub.py)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO
from helpers.fake_hub import FakeHub, point_at
from launcher import builtin, hub
from launcher.errors import UserError

TOKEN = "hf_abcdefghijklmnopqrstuvwx"  # the gated repo's token: must never reach a file of the run


@pytest.fixture(scope="module")
def fake_hub(cache_dir):
    h = FakeHub()
    tiny = builtin.materialize("builtin:tiny-llama", cache_dir)
    h.commit = h.add_dir("model", "acme/tiny-llama", tiny)
    h.add_dir("model", "acme/gated-llama", tiny, token=TOKEN)
    h.dataset_commit = h.add("dataset", "acme/repeat", _dataset_files())
    h.add("model", "acme/pickled", {"config.json": (tiny / "config.json").read_bytes(), "pytorch_model.bin": b"\x80\x04pickle"})
    yield h
    h.close()


README = """---
configs:
- config_name: repeat
  data_files:
  - {split: train, path: repeat/train.jsonl}
  - {split: test, path: repeat/test.jsonl}
- config_name: sharegpt
  data_files:
  - {split: train, path: sharegpt/train.jsonl}
---
A dataset of the quickstart's task, in two subsets.
"""


def _dataset_files():
    import random

    rng = random.Random(0)
    words = [" ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4)) for _ in range(70)]
    conv = [json.dumps({"conversation": [{"role": "user", "content": f"repeat: {w}"}, {"role": "assistant", "content": w}], "id": i}) for i, w in enumerate(words)]
    share = [json.dumps({"conversations": [{"from": "human", "value": f"repeat: {w}"}, {"from": "gpt", "value": w}]}) for w in words[:20]]
    return {"README.md": README.encode(), "repeat/train.jsonl": "\n".join(conv[:60]).encode() + b"\n",
            "repeat/test.jsonl": "\n".join(conv[60:]).encode() + b"\n", "sharegpt/train.jsonl": "\n".join(share).encode() + b"\n"}


MIXTURE = """extends: {quickstart}
data:
  train_files: []
  sources:
  - {{path: acme/repeat, subset: {subset}, columns: {{messages: {column}}}, {hub}}}
  - {{path: {quickstart_data}, {local}}}
"""


def _mixture_recipe(tmp_path, hub="weight: 3", local="weight: 1", column="conversation", subset="repeat"):
    path = tmp_path / "mixture.yaml"
    path.write_text(MIXTURE.format(quickstart=REPO / "recipes" / "quickstart.yaml", hub=hub, local=local, column=column, subset=subset,
                                   quickstart_data=REPO / "recipes" / "data" / "quickstart" / "train.jsonl"))
    return str(path)


@pytest.fixture
def in_process_hub(fake_hub, tmp_path, monkeypatch):
    """huggingface_hub in this process talks to the fake Hub, with an empty HF cache."""
    from huggingface_hub import constants

    point_at(monkeypatch, fake_hub.url, tmp_path / "hf" / "hub")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "_resolved", {})
    return constants


def _env(fake_hub, home):
    env = {k: v for k, v in os.environ.items() if k != hub.PINS_ENV}
    return {**env, "HF_ENDPOINT": fake_hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # two launchers and two workers, ~50 s on an idle machine
def test_run_by_hub_id_on_two_nodes_downloads_once_records_the_commit_and_exports(fake_hub, tmp_path, cache_dir):
    fake_hub.downloads.clear()
    run_dir, home = tmp_path / "run", tmp_path / "hf-home"  # one HF_HOME for both nodes, as on a shared filesystem
    common = [_mixture_recipe(tmp_path), "model.path=acme/tiny-llama", f"data.cache_dir={cache_dir}", f"output_dir={run_dir}",
              "train.max_steps=2", "train.eval_generate=0", "train.eval_at_start=false", "export.verify_prompts=1"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "launcher", "run", *common, "--nproc", "1", "--nnodes", "2", "--node-rank", str(rank),
                               "--rdzv-endpoint", f"127.0.0.1:{port}"], cwd=REPO, env=_env(fake_hub, home),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (1, 0)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    # Both nodes resolved the id before their workers started; the files crossed the network once.
    files = {p for (repo, p) in fake_hub.downloads}
    assert {"model.safetensors", "config.json", "repeat/train.jsonl"} <= files
    assert all(n == 1 for n in fake_hub.downloads.values()), fake_hub.downloads
    assert f"Hub model acme/tiny-llama revision main = commit {fake_hub.commit}" in outputs[1]
    record = json.loads((run_dir / "hub.json").read_text())
    assert [(r["kind"], r["repo"], r["revision"], r["commit"]) for r in record] == [
        ("model", "acme/tiny-llama", "main", fake_hub.commit), ("dataset", "acme/repeat", "main", fake_hub.dataset_commit)]
    assert "mixture: acme/repeat[repeat]:train: 60 rows" in outputs[1]
    assert (run_dir / "final" / "model.safetensors").is_file()
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked, leaked  # HF_TOKEN was in both nodes' environment



def test_bad_hub_models_are_one_paragraph_each(in_process_hub, fake_hub, monkeypatch):
    cases = [
        ("acme/no-such-model", None, "neither a local path nor a model repository on the Hugging Face Hub"),
        ("acme/tiny-llama", "v9", "model.revision: 'v9' is not a branch, tag or commit of the model acme/tiny-llama"),
        ("acme/gated-llama", None, "is gated: .*export HF_TOKEN="),
        ("acme/pickled", None, r"only as pickle files \(pytorch_model.bin\).*safetensors only"),
    ]
    for repo, revision, message in cases:
        with pytest.raises(UserError, match=message) as e:
            hub.resolve("model", repo, revision, "model.path")
        assert "\n" not in str(e.value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hub.resolve("model", "acme/gated-llama", None, "model.path").commit == fake_hub.commit


def test_gated_model_without_token_fails_before_workers(in_process_hub, tmp_path, cache_dir, capsys):
    from launcher.cli import main

    code = main(["run", "recipes/quickstart.yaml", "model.path=acme/gated-llama", f"data.cache_dir={cache_dir}", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "acme/gated-llama is gated" in err, err
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_weighted_mixture_of_a_hub_dataset_and_a_local_file(in_process_hub, tmp_path, cache_dir):
    from launcher.plan import format_plan, make_plan
    from launcher.recipe import load_recipe

    def plan(**sources):
        recipe = load_recipe(_mixture_recipe(tmp_path, **sources), [f"data.cache_dir={cache_dir}", f"output_dir={tmp_path / 'run'}"])
        return make_plan(recipe), recipe

    p, recipe = plan()
    # weight 3 : 1 and no row twice: all 60 Hub rows (the scarce source) and 20 of the 4000 local ones
    assert [(m.rows, round(m.share, 4)) for m in p.mixture] == [(60, 0.75), (20, 0.25)]
    assert p.train_examples == 80 and all(m.tokens > 0 for m in p.mixture)
    text = format_plan(p, recipe)
    assert "mixture: acme/repeat[repeat]:train: 60 rows" in text and "75.0% of the mixture" in text
    from launcher.data.prepare import prepare
    from launcher.model import load_tokenizer

    tok = load_tokenizer(p.model_path, recipe.model)
    rows = lambda seed: prepare(recipe.data, tok, cache_dir, seed).train["input_ids"]  # noqa: E731
    assert rows(42) == rows(42) and rows(42) != rows(7)  # deterministic from the seed
    p2, _ = plan(hub="fraction: 2.0", local="fraction: 0.01")  # each Hub row twice, 1% of the local file
    assert [m.rows for m in p2.mixture] == [120, 40]


@pytest.mark.parametrize("change, message", [
    (dict(subset="nope"), r"data.sources\[0\].subset: acme/repeat has no subset 'nope'; its subsets are repeat, sharegpt"),
    (dict(hub="weight: 3, split: validation"), r"data.sources\[0\].split: acme/repeat\[repeat\] has no split 'validation'; its splits are train, test"),
    (dict(column="dialogue"), r"data.sources\[0\].columns: acme/repeat\[repeat\]:train has no column 'dialogue'; its columns are conversation, id"),
    (dict(hub="weight: 3, revision: v2"), r"data.sources\[0\].revision: 'v2' is not a branch, tag or commit of the dataset acme/repeat"),
    (dict(local="weight: -1"), r"data.sources\[1\].weight` \(.*\) is -1; weights are shares of the mixture and must be >= 0"),
    (dict(hub="weight: 0", local="weight: 0"), "every weight is 0"),
])
def test_bad_sources_are_one_paragraph_each(in_process_hub, tmp_path, cache_dir, change, message):
    from launcher.plan import make_plan
    from launcher.recipe import load_recipe

    with pytest.raises(UserError, match=message) as e:
        make_plan(load_recipe(_mixture_recipe(tmp_path, **change), [f"data.cache_dir={cache_dir}"]))
    assert "\n" not in str(e.value)


def test_submit_resolves_on_the_login_node_and_records_the_commit(in_process_hub, fake_hub, tmp_path, cache_dir, monkeypatch, capsys):
    from launcher.cli import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run_dir = tmp_path / "job"
    code = main(["submit", "recipes/quickstart.yaml", "model.path=acme/gated-llama", f"data.cache_dir={cache_dir}", f"output_dir={run_dir}",
                 "slurm.nodes=2", "--dry-run"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run_dir / "hub.json").read_text())[0]["commit"] == fake_hub.commit
    assert all(TOKEN not in p.read_text() for p in run_dir.rglob("*") if p.is_file())  # submit.sbatch included

    # On a compute node without the Hub: the recorded commit is read from the shared cache, with no request.
    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE
    point_at(monkeypatch, "http://127.0.0.1:9", cache)
    hub.use_pins(run_dir)
    assert hub.resolve("model", "acme/gated-llama", None, "model.path").commit == fake_hub.commit
    point_at(monkeypatch, "http://127.0.0.1:9", cache)  # no pins: main is found through the cache's refs/main
    assert hub.resolve("model", "acme/gated-llama", None, "model.path").commit == fake_hub.commit
    point_at(monkeypatch, "http://127.0.0.1:9", tmp_path / "empty-cache")
    with pytest.raises(UserError, match="is not in the HF cache .* cannot be reached"):
        hub.resolve("model", "acme/gated-llama", None, "model.path")
