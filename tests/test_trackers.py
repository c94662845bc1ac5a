"""Trackers and curves from real runs: one `sft run` reporting to TensorBoard, W&B (offline) and
MLflow (a local store) at once, stopped at step 2 and resumed to step 4, read back with each
tracker's own reader; then the curves it drew, and `sft plot` on a killed run's partial file.
"""

import json
import socket
import struct
import sys

import pytest

from conftest import run_sft

QUICKSTART = "recipes/quickstart.yaml"


def _args(run_dir, cache_dir, steps):
    return ["run", QUICKSTART, f"output_dir={run_dir}", f"data.cache_dir={cache_dir}", f"train.max_steps={steps}",
            "train.eval_every=2", "train.eval_generate=0", "train.eval_at_start=false", "logging.every_steps=1",
            "export.on_finish=false", "logging.report_to=[tensorboard,wandb,mlflow]",
            f"logging.mlflow_tracking_uri=file://{run_dir.parent / 'mlruns'}", "name=tracked"]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("trackers") / "run"
    # W&B offline from the environment; MLflow's file store is in maintenance mode and asks for this opt-in.
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}
    first = run_sft(_args(run_dir, cache_dir, 2), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    ids = json.loads((run_dir / "trackers.json").read_text())
    resumed = run_sft(_args(run_dir, cache_dir, 4), env=env)  # a larger max_steps continues the run
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, ids, {r["step"]: r["loss"] for r in rows if "loss" in r}, rows


@pytest.mark.slow
def test_tensorboard_events_carry_the_loss(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, loss, rows = tracked
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    got = {e.step: e.value for e in acc.Scalars("loss")}
    assert sorted(got) == [1, 2, 3, 4]
    assert got == pytest.approx(loss, rel=1e-6)
    assert {e.step for e in acc.Scalars("eval_loss")} == {2, 4}
    assert "checkpoint_save_s" in acc.Tags()["scalars"] and "checkpoint_load_s" in acc.Tags()["scalars"]


@pytest.mark.slow
def test_mlflow_run_continues_and_carries_the_loss(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir, ids, loss, _ = tracked
    client = MlflowClient(tracking_uri=f"file://{run_dir.parent / 'mlruns'}")
    run = client.get_run(ids["mlflow"])  # the id the first attempt saved: the resume logged into the same run
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model.path"] == "builtin:tiny-llama"
    history = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "loss")}
    assert history == pytest.approx(loss, rel=1e-9)
    assert len(client.search_runs([run.info.experiment_id])) == 1


def _wandb_records(path):
    """The records of a .wandb file (LevelDB log format: 32 KiB blocks of crc32/length/type framed chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, out = path.read_bytes(), 7, b"", []  # 7: W&B's own header
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


@pytest.mark.slow
def test_wandb_offline_runs_carry_the_loss_under_one_id(tracked):
    run_dir, ids, loss, _ = tracked
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(ids["wandb"]) for p in attempts)
    logged, config = {}, {}
    for attempt in attempts:
        for record in _wandb_records(attempt / f"run-{ids['wandb']}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                if "loss" in item:
                    logged[item["step"]] = item["loss"]
            elif kind == "run":
                config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.run.config.update})
                assert record.run.display_name == "tracked"
    assert logged == pytest.approx(loss, rel=1e-9)
    assert config["train"]["lr"] == 0.003 and config["model"]["path"] == "builtin:tiny-llama"


def _decoded(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path))


@pytest.mark.slow
def test_finished_run_draws_curves(tracked):
    run_dir = tracked[0]
    image = _decoded(run_dir / "curves.png")
    assert image.shape[:2] == (960, 1100)  # 11 x 9.6 inches at 100 dpi: three rows of panels
    pixels = image[..., :3].reshape(-1, 3)
    assert pixels.std() > 0.05 and len({tuple(p) for p in pixels[::37]}) > 20  # drawn, not blank


@pytest.mark.slow
def test_plot_reads_a_killed_runs_partial_metrics(tracked, tmp_path, capsys):
    from launcher.cli import main

    text = (tracked[0] / "metrics.jsonl").read_text()
    lines = text.splitlines()
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])  # cut mid-write
    assert main(["plot", str(killed), "--out", str(tmp_path / "c.png")]) == 0
    assert _decoded(tmp_path / "c.png").shape[:2] == (640, 1100)  # loss, lr, grad norm, tokens/s: two rows
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_plot_draws_a_classifiers_accuracy_and_f1(tmp_path):
    from launcher.plot import plot

    rows = [{"step": s, "loss": 1 / s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0} for s in (1, 2, 3)]
    rows += [{"step": s, "eval_loss": 1 / (s + 1), "eval_accuracy": s / 4, "eval_macro_f1": s / 5, "eval_per_class": {"a": {"f1": 1}}} for s in (0, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _decoded(plot(tmp_path)).shape[:2] == (960, 1100)  # a fifth panel: a third row


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "override,uri,message",
    [
        ("logging.report_to=[tensorbored]", None, "unknown tracker 'tensorbored'"),
        ("logging.report_to=[wandb]", None, "pip install 'sft-launcher[wandb]'"),
        ("logging.report_to=[wandb] logging.wandb_mode=online", None, "no W&B API key is set"),
        ("logging.report_to=[mlflow]", "http://127.0.0.1:{port}", "http://127.0.0.1:{port} cannot be reached"),
        ("logging.report_to=[mlflow]", "file:///tmp/mlruns-{port}", "MLFLOW_ALLOW_FILE_STORE=true"),
    ],
)
def test_plan_rejects_bad_tracker_settings(override, uri, message, cache_dir, capsys, monkeypatch, tmp_path):
    from launcher.cli import main

    if override == "logging.report_to=[wandb]":
        monkeypatch.setitem(sys.modules, "wandb", None)  # Python's own marker of a module that cannot be imported
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    port = _free_port()
    if uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(port=port))
    assert main(["plan", QUICKSTART, *override.split(), f"data.cache_dir={cache_dir}"]) == 2
    err = capsys.readouterr().err
    assert message.format(port=port) in err and "Traceback" not in err
