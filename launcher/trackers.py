"""Experiment trackers (`logging.report_to`): TensorBoard, Weights & Biases, MLflow, on rank 0.

Each gets the rows metrics.jsonl gets (MetricsLog fans them out), the run is named after
the recipe, the resolved and redacted recipe is its config, and a resumed run continues the
same tracker run: the ids are kept in output_dir/trackers.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from launcher.errors import UserError

NAMES = ("tensorboard", "wandb", "mlflow")
# The import each tracker needs, and the extra that installs it.
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
IDS_FILE = "trackers.json"


def _config(recipe) -> dict:
    import yaml

    from launcher.rundir import to_yaml

    return yaml.safe_load(to_yaml(recipe, redact=True))


def _flatten(node: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _scalars(row: dict) -> dict:
    """The numbers of a row; tables (per-class metrics, generations) stay in metrics.jsonl."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def mlflow_uri(recipe) -> "str | None":
    return recipe.logging.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def wandb_mode(recipe) -> str:
    return recipe.logging.wandb_mode or os.environ.get("WANDB_MODE") or "online"


def _check_mlflow_uri(uri: str) -> None:
    """Fail at plan time, naming the URI, rather than at step 1 on rank 0 (MLflow retries for minutes)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=5).close()
        except OSError as e:
            raise UserError(
                f"logging.mlflow_tracking_uri (or MLFLOW_TRACKING_URI): the MLflow server {uri} cannot be reached ({e}). "
                "Start the server, fix the URI, or remove mlflow from logging.report_to."
            ) from None
        return
    if parsed.scheme in ("", "file", "sqlite"):
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as e:
            raise UserError(f"logging.mlflow_tracking_uri (or MLFLOW_TRACKING_URI): MLflow cannot open the store {uri}: "
                            f"{str(e).splitlines()[0]} Fix the URI, or remove mlflow from logging.report_to.") from None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _check_wandb_login() -> None:
    """Online W&B needs a key (WANDB_API_KEY, or ~/.netrc from `wandb login`); without one, wandb.init fails on rank 0."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    import netrc

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    raise UserError(
        f"logging.report_to has wandb in online mode, but no W&B API key is set (WANDB_API_KEY, or {host} in ~/.netrc). "
        "Run `wandb login` or set WANDB_API_KEY, or log offline with logging.wandb_mode=offline (or WANDB_MODE=offline) and `wandb sync` later."
    )


def check(recipe) -> None:
    """`sft plan`: every tracker named is installed, and an MLflow URI answers."""
    missing = [n for n in recipe.logging.report_to if not _installed(_PACKAGES[n])]
    if missing:
        extras = ",".join(missing)
        raise UserError(
            f"logging.report_to names {', '.join(missing)}, but the package is not installed. "
            f"Install it with pip install 'sft-launcher[{extras}]' (or pip install {' '.join(_PACKAGES[n] for n in missing)}), "
            "or remove it from logging.report_to."
        )
    if "wandb" in recipe.logging.report_to and wandb_mode(recipe) == "online":
        _check_wandb_login()
    if "mlflow" in recipe.logging.report_to:
        import mlflow

        _check_mlflow_uri(mlflow_uri(recipe) or mlflow.get_tracking_uri())


class TensorBoard:
    def __init__(self, recipe, run_dir: Path, ids: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # One log dir per run dir: a resumed run appends a new event file there, which TensorBoard merges;
        # purge_step drops what an earlier attempt logged after the checkpoint (those steps are trained again).
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("recipe", "```\n" + json.dumps(_config(recipe), indent=1) + "\n```", 0)

    def log(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a killed run keeps what was logged, as metrics.jsonl does

    def close(self, finished: bool) -> None:
        self.writer.close()


class WandB:
    def __init__(self, recipe, run_dir: Path, ids: dict, start_step: int):
        import wandb

        ids.setdefault("wandb", uuid.uuid4().hex[:12])  # ours, so it is known before init and saved for a resume
        lo = recipe.logging
        self.run = wandb.init(project=lo.wandb_project or "sft-launcher", entity=lo.wandb_entity, name=recipe.name,
                              id=ids["wandb"], resume="allow", dir=str(run_dir), mode=wandb_mode(recipe),
                              config=_config(recipe), settings=wandb.Settings(console="off", silent=True))
        # Our step is a metric, not W&B's own counter: steps logged again after a resume are accepted.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, values: dict) -> None:
        self.run.log({"step": step, **values})

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class MLflow:
    def __init__(self, recipe, run_dir: Path, ids: dict, start_step: int):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=mlflow_uri(recipe))
        if "mlflow" in ids:
            self.run_id = ids["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
            logged = self.client.get_run(self.run_id).data.params
        else:
            name = recipe.logging.mlflow_experiment or "sft-launcher"
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            self.run_id = ids["mlflow"] = self.client.create_run(exp_id, run_name=recipe.name).info.run_id
            logged = {}
        # MLflow refuses to change a param; a resume may change the free keys (launch.*, logging.*): keep the first.
        params = [Param(k, str(v)[:6000]) for k, v in _flatten(_config(recipe)).items() if k not in logged]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, values: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


_CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """The trackers of `logging.report_to`, opened on rank 0; ids saved so a resume continues them."""

    def __init__(self, recipe, run_dir: Path, start_step: int = 0):
        path = Path(run_dir) / IDS_FILE
        ids = json.loads(path.read_text()) if path.is_file() else {}
        self.open = [_CLASSES[name](recipe, Path(run_dir), ids, start_step) for name in recipe.logging.report_to]
        if self.open:
            path.write_text(json.dumps(ids, indent=1) + "\n")

    def log(self, row: dict) -> None:
        values = _scalars(row)
        if values:
            for t in self.open:
                t.log(int(row["step"]), values)

    def close(self, finished: bool = True) -> None:
        for t in self.open:
            t.close(finished)
        self.open = []
