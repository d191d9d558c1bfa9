"""Experiment tracking against the real thing: a tiny `dynammo run` with tracking=mlflow into a
local MLflow file store, read back with MLflow's own client (no mock): the metrics equal
results.json, the params are the config, the artifacts are there; a resumed run continues its
MLflow run; TensorBoard gets the new scalars; a missing mlflow package stops the run in one line."""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
import yaml

from dynammo.cli import main
from dynammo.configure import build_config
from dynammo.run.sinks import task_metrics
from dynammo.run.sinks.mlflow import flat_params
from dynammo.run.sinks.tensorboard import tensorboard_on
from method_helpers import tiny_run_args

pytestmark = pytest.mark.usefixtures("single_thread")

mlflow = pytest.importorskip("mlflow")  # the test extra installs mlflow-skinny
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to read a file store
from mlflow.tracking import MlflowClient  # noqa: E402

PER_TASK = {"acc": "acc", "mcr": "mcr", "task_il_acc": "task_il_acc", "task_id_acc": "task_id_acc", "ece": "ece"}
OPENSET = ("auroc", "fpr95", "aupr", "aupr_out")


@pytest.fixture(scope="module")
def mlflow_run(run_in_process, tmp_path_factory):
    """A tiny ACL run (task-id accuracy, the 'others' score) logged to a fresh file store."""
    base = tmp_path_factory.mktemp("mlflow")
    uri = (base / "store").as_uri()
    out = base / "acl"
    assert run_in_process("run", "--out", str(out), *tiny_run_args("acl", tracking="mlflow", mlflow_uri=uri)) == 0
    return out, uri, json.loads((out / "results.json").read_text())


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_logged_metrics_equal_results_json(mlflow_run):
    out, uri, r = mlflow_run
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("digits")  # the default experiment: the protocol's name
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == r["tracking"]["run_id"] and r["tracking"]["uri"] == uri
    assert run.info.status == "FINISHED"
    T = len(r["acc"])
    for name, key in PER_TASK.items():
        assert history(client, run.info.run_id, name) == [(j + 1, r[key][j]) for j in range(T)], name
    for key in OPENSET:
        want = [(j + 1, v) for j, v in enumerate(r["openset"][key]) if v is not None]
        assert len(want) == T - 1  # none after the last task
        assert history(client, run.info.run_id, f"openset_{key}") == want, key
        assert history(client, run.info.run_id, f"openset_avg_{key}") == [(T, r["openset"][f"avg_{key}"])]
    for key in ("inference_gflops", "params_total", "memory_exemplars"):
        assert history(client, run.info.run_id, key) == [(j + 1, float(c[key])) for j, c in enumerate(r["cost"])]
    for key in ("avg_acc", "last_acc", "forgetting", "bwt", "avg_ece"):
        assert history(client, run.info.run_id, key) == [(T, r[key])], key


def test_params_are_the_resolved_config_and_the_artifacts_are_there(mlflow_run, tmp_path):
    out, uri, r = mlflow_run
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(r["tracking"]["run_id"])
    params = run.data.params
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert params == flat_params(cfg)
    assert params["method"] == "acl" and params["protocol"] == "digits"
    assert json.loads(params["seed"]) == 0 and json.loads(params["layer_names"]) is None
    assert run.data.tags["dynammo.protocol_hash"] == r["protocol"]["hash"]
    assert run.data.tags["dynammo.run_dir"] == str(out.resolve())
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "config.yaml", "metrics.csv", "log.txt"} <= names
    local = client.download_artifacts(run.info.run_id, "results.json", str(tmp_path))
    assert json.loads(open(local).read()) == r
    assert not (out / "tb").exists()  # MLflow instead of TensorBoard


def test_task_metrics_leave_out_nulls():
    r = {"acc": [50.0, 40.0], "ece": [3.0, None], "openset": {"auroc": [70.0, None]}, "cost": [{"params_total": 5}]}
    assert task_metrics(r, 0) == {"acc": 50.0, "ece": 3.0, "openset_auroc": 70.0, "params_total": 5.0}
    assert task_metrics(r, 1) == {"acc": 40.0}


def test_flat_params():
    assert flat_params({"a": 1, "b": [1, 2], "c": None, "d": "x", "e": {"f": True}, "g": 0.5}) == {
        "a": "1", "b": "[1, 2]", "c": "null", "d": "x", "e.f": "true", "g": "0.5"}
    assert len(flat_params({"long": list(range(5000))})["long"]) == 6000


def test_which_tracker_is_on():
    assert tensorboard_on(build_config({}))  # the default: TensorBoard
    assert not tensorboard_on(build_config({"tensorboard": False}))
    assert not tensorboard_on(build_config({"tracking": "mlflow"}))
    assert not tensorboard_on(build_config({"tracking": "none"}))


def test_tensorboard_gets_the_open_set_and_calibration_scalars(run_in_process, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb_run"
    assert run_in_process("run", "--out", out, *tiny_run_args("finetune", tensorboard="true", eval_openset="true")) == 0
    r = json.loads((out / "results.json").read_text())
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/acc", "eval/ece", "eval/openset_auroc", "eval/openset_fpr95"} <= tags
    assert [(e.step, e.value) for e in acc.Scalars("eval/ece")] == [(j + 1, pytest.approx(v)) for j, v in enumerate(r["ece"])]
    assert len(acc.Scalars("eval/openset_auroc")) == len(r["acc"]) - 1


def test_missing_mlflow_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError, as when absent
    out = tmp_path / "never"
    rc = main(["run", "--out", str(out), *tiny_run_args("finetune", tracking="mlflow")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'dynammo[mlflow]'" in lines[0], err
    assert not out.exists()


def test_an_unreachable_store_is_one_line_before_anything_is_written(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = tmp_path / "never"
    rc = main(["run", "--out", str(out), *tiny_run_args("finetune", tracking="mlflow",
                                                        mlflow_uri=(blocker / "store").as_uri())])
    err = capsys.readouterr().err
    assert rc == 2 and "MLflow tracking at" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_resumed_run_continues_its_mlflow_run(cli, tmp_path):
    """SIGTERM inside task 2 of a real run, then `dynammo resume`: one MLflow run, each task's
    metrics once, equal to results.json."""
    uri = (tmp_path / "store").as_uri()
    out = tmp_path / "run"
    args = tiny_run_args("finetune", tracking="mlflow", mlflow_uri=uri, epochs=12, max_train_per_class=30)
    proc = cli.popen("-m", "dynammo", "run", "--out", out, *args)
    t0 = time.time()
    while not ((out / "log.txt").exists() and "task 2/3 train epoch 1/" in (out / "log.txt").read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 300
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err
    client = MlflowClient(tracking_uri=uri)
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "interrupted"
    run_id = r["tracking"]["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    assert history(client, run_id, "acc") == [(1, r["acc"][0])]
    proc = cli("resume", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "complete" and r["tracking"]["run_id"] == run_id
    exp = client.get_experiment_by_name("digits")
    assert [x.info.run_id for x in client.search_runs([exp.experiment_id])] == [run_id]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert history(client, run_id, "acc") == [(j + 1, v) for j, v in enumerate(r["acc"])]
    assert history(client, run_id, "openset_auroc") == [(j + 1, v) for j, v in enumerate(r["openset"]["auroc"][:-1])]


def test_the_default_store_is_mlruns_of_the_working_directory(tmp_path, monkeypatch):
    from dynammo.run.sinks.mlflow import default_uri, is_file_store

    monkeypatch.chdir(tmp_path)
    assert default_uri() == (tmp_path / "mlruns").resolve().as_uri()
    assert is_file_store(default_uri()) and is_file_store("mlruns") and is_file_store("file:///x/mlruns")
    assert not is_file_store("http://localhost:5000") and not is_file_store("sqlite:///mlflow.db")
