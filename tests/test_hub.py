"""Models by Hub id, served to the real huggingface_hub client by a Hub on 127.0.0.1 (helpers/fake_hub.py)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO, run_sft
from helpers.fake_hub import FakeHub
from launcher import builtin, hub
from launcher.errors import UserError

TOKEN = "hf_abcdefghijklmnopqrstuvwx"  # the gated repo's token: must never reach a file of the run


@pytest.fixture(scope="module")
def fake_hub(cache_dir):
    h = FakeHub()
    tiny = builtin.materialize("builtin:tiny-llama", cache_dir)
    h.commit = h.add_dir("model", "acme/tiny-llama", tiny)
    h.add_dir("model", "acme/gated-llama", tiny, token=TOKEN)
    h.add("model", "acme/pickled", {"config.json": (tiny / "config.json").read_bytes(), "pytorch_model.bin": b"\x80\x04pickle"})
    yield h
    h.close()


@pytest.fixture
def in_process_hub(fake_hub, tmp_path, monkeypatch):
    """huggingface_hub in this process talks to the fake Hub, with an empty HF cache."""
    from huggingface_hub import constants

    _point_at(monkeypatch, fake_hub.url, tmp_path / "hf" / "hub")
    monkeypatch.delenv(hub.PINS_ENV, raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "_resolved", {})
    return constants


def _point_at(monkeypatch, url, cache):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def _env(fake_hub, home):
    env = {k: v for k, v in os.environ.items() if k != hub.PINS_ENV}
    return {**env, "HF_ENDPOINT": fake_hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}


def test_run_by_hub_id_on_two_nodes_downloads_once_records_the_commit_and_exports(fake_hub, tmp_path, cache_dir, monkeypatch):
    fake_hub.downloads.clear()
    run_dir, home = tmp_path / "run", tmp_path / "hf-home"  # one HF_HOME for both nodes, as on a shared filesystem
    common = ["recipes/quickstart.yaml", "model.path=acme/tiny-llama", f"data.cache_dir={cache_dir}", f"output_dir={run_dir}",
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
    files = {p for (repo, p) in fake_hub.downloads if repo == "acme/tiny-llama"}
    assert "model.safetensors" in files and "config.json" in files
    assert all(n == 1 for n in fake_hub.downloads.values()), fake_hub.downloads
    assert f"Hub model acme/tiny-llama revision main = commit {fake_hub.commit}" in outputs[1]
    record = json.loads((run_dir / "hub.json").read_text())
    assert [(r["repo"], r["revision"], r["commit"]) for r in record] == [("acme/tiny-llama", "main", fake_hub.commit)]
    assert (run_dir / "final" / "model.safetensors").is_file()
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked, leaked  # HF_TOKEN was in both nodes' environment

    # The job's commit is pinned: with the Hub gone (a compute node offline) the run dir's record is read
    # from the cache; without the record the same id cannot be resolved.
    _point_at(monkeypatch, "http://127.0.0.1:9", home / "hub")
    monkeypatch.delenv(hub.PINS_ENV, raising=False)
    monkeypatch.setattr(hub, "_resolved", {})
    hub.use_pins(run_dir)
    assert hub.resolve("model", "acme/tiny-llama", None, "model.path").commit == fake_hub.commit
    monkeypatch.delenv(hub.PINS_ENV)
    monkeypatch.setattr(hub, "_resolved", {})
    with pytest.raises(UserError, match="is not in the HF cache .* cannot be reached"):
        hub.resolve("model", "acme/tiny-llama", None, "model.path")


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


def test_gated_model_without_token_fails_before_workers(fake_hub, tmp_path, cache_dir):
    env = {k: v for k, v in _env(fake_hub, tmp_path / "hf").items() if k != "HF_TOKEN"}
    proc = run_sft(["run", "recipes/quickstart.yaml", "model.path=acme/gated-llama", f"data.cache_dir={cache_dir}",
                    f"output_dir={tmp_path / 'run'}"], env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "acme/gated-llama is gated" in proc.stderr and not (tmp_path / "run").exists()
