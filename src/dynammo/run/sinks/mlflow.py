"""MLflow (tracking=mlflow): one MLflow run per run directory (per seed), instead of tb/.

params = the resolved config (flattened, lists as JSON); metrics of each task (step = the task
number, 1-based, as in TensorBoard and metrics.csv) and, at the end, the run's single numbers (step =
the number of tasks); artifacts results.json, config.yaml, metrics.csv, log.txt and plots/. The store
is `mlflow_uri` (default: the file store mlruns/ of the working directory), the experiment
`mlflow_experiment` (default: the protocol's name, else "dynammo"). results.json `tracking` records the
URI, the experiment and the run id; `dynammo resume` continues that MLflow run.

`check_tracking` runs before anything is built, `start` before anything is written (a store that
cannot be reached stops the run there, in one line). A failure in the middle of a run prints one line
and stops tracking; the run goes on.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, Optional
from urllib.parse import urlparse

from dynammo.errors import UserError
from dynammo.run.sinks import Sink, TaskRecord, final_metrics, task_metrics

INSTALL_HINT = "pip install 'dynammo[mlflow]'"
# MLflow's limits on one param value and on one log_batch call
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 5000
BATCH_PARAMS = 100
MLFLOW_STATUS = {"complete": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}


def check_tracking(cfg) -> None:
    """Before anything is written: tracking=mlflow needs the mlflow package."""
    if cfg.get("tracking") == "mlflow":
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise UserError(f"tracking=mlflow needs the mlflow package, which is not installed: {INSTALL_HINT} "
                            "(or set tracking=tensorboard)") from None


def flat_params(cfg: dict, prefix: str = "") -> Dict[str, str]:
    """The config as MLflow params: nested mappings flattened to dotted keys, values as strings
    (lists and mappings as JSON, None as "null"), cut to MLflow's limit."""
    out: Dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        out[name] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
    return out


def default_uri() -> str:
    return (Path.cwd() / "mlruns").resolve().as_uri()


def is_file_store(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a bare path (a Windows drive letter too)


class MLflowSink(Sink):
    def __init__(self, cfg, run_dir: Path, console):
        self.cfg, self.dir, self.console = cfg, Path(run_dir), console
        self.client = None
        self.run_id: Optional[str] = None
        self.record: dict = {}

    def _fail(self, what: str, exc: Exception) -> None:
        """In the middle of a run: one line, then no more tracking (the run itself goes on)."""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        self.console.print(f"warning: MLflow {what} failed ({first}); MLflow tracking is off for the rest of the run")
        self.client = None

    def start(self, results: dict) -> None:
        from mlflow.tracking import MlflowClient

        record = results.get("tracking") or {}
        if record.get("kind") == "mlflow" and record.get("run_id"):  # a resumed run: the same MLflow run
            uri, experiment = record["uri"], record["experiment"]
        else:
            uri = self.cfg.get("mlflow_uri") or default_uri()
            experiment = self.cfg.get("mlflow_experiment") or self.cfg.get("protocol") or "dynammo"
        if is_file_store(uri):
            # MLflow 3 refuses its file store unless asked for; it is this option's documented default
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client = MlflowClient(tracking_uri=uri)
            if record.get("run_id"):
                self.run_id = record["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                self._log_missing_tasks(results)
            else:
                self.run_id = self._create_run(experiment, results)
        except Exception as exc:  # the store cannot be reached or written: before anything is written
            self.client = None
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"MLflow tracking at {uri} failed: {first}; fix mlflow_uri or set tracking=tensorboard") from None
        self.record = {"kind": "mlflow", "uri": uri, "experiment": experiment, "run_id": self.run_id}
        results["tracking"] = dict(self.record)

    def open(self) -> None:
        r = self.record
        self.console.print(f"MLflow: run {r['run_id']} of experiment '{r['experiment']}' at {r['uri']}")

    def _create_run(self, experiment: str, results: dict) -> str:
        from mlflow.entities import Param, RunTag

        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        protocol = results.get("protocol") or {}
        tags = {"mlflow.runName": f"{results.get('label', self.cfg.get('method'))} seed {self.cfg.get('seed')}",
                "dynammo.run_dir": str(self.dir.resolve()), "dynammo.method": str(self.cfg.get("method")),
                "dynammo.label": str(results.get("label")), "dynammo.protocol": str(protocol.get("name")),
                "dynammo.protocol_hash": str(protocol.get("hash")), "dynammo.dataset": str(results.get("dataset"))}
        run = self.client.create_run(exp_id, tags=tags)
        params = [Param(k, v) for k, v in flat_params(dict(self.cfg)).items()]
        for i in range(0, len(params), BATCH_PARAMS):
            self.client.log_batch(run.info.run_id, params=params[i:i + BATCH_PARAMS])
        deviations = json.dumps(results.get("deviations") or [])[:MAX_TAG_CHARS]
        self.client.log_batch(run.info.run_id, tags=[RunTag("dynammo.deviations", deviations)])
        return run.info.run_id

    def _log_missing_tasks(self, results: dict) -> None:
        """A resumed run: the tasks finished before the stop whose metrics did not reach MLflow."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "acc")}
        for j in range(len(results.get("acc") or [])):
            if j + 1 not in logged:
                self._log(task_metrics(results, j), j + 1)

    def _log(self, metrics: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if metrics:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def task_done(self, record: TaskRecord) -> None:
        if self.client is None:
            return
        try:
            self._log(task_metrics(record.results, record.task.id), record.task.id + 1)
        except Exception as exc:
            self._fail("logging", exc)

    def close(self, results: dict, status: str) -> None:
        if self.client is None:
            return
        try:
            if status == "complete":
                self._log(final_metrics(results), len(results.get("acc") or []))
            for name in ("results.json", "config.yaml", "metrics.csv", "log.txt"):
                if (self.dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(self.dir / name))
            if (self.dir / "plots").is_dir():
                self.client.log_artifacts(self.run_id, str(self.dir / "plots"), "plots")
            self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))
        except Exception as exc:
            self._fail("the final upload", exc)
