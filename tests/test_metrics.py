"""Metrics against numbers worked out by hand from DESIGN.md's definitions."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dynammo import metrics
from dynammo.metrics import ContinualMetrics, bwt, confusion_matrix, forgetting, task_il_predictions

pytestmark = pytest.mark.usefixtures("single_thread")


def test_forgetting_and_bwt_three_tasks():
    a = [[90.0, None, None],
         [70.0, 80.0, None],
         [50.0, 60.0, 85.0]]
    # forgetting: task 0: max(90, 70) - 50 = 40; task 1: max(80) - 60 = 20 -> 30
    assert forgetting(a) == pytest.approx(30.0)
    # bwt: (50 - 90) + (60 - 80) = -60 over 2 tasks -> -30
    assert bwt(a) == pytest.approx(-30.0)


def test_forgetting_uses_the_best_earlier_accuracy_not_the_diagonal():
    a = [[60.0, None, None],
         [80.0, 70.0, None],
         [40.0, 75.0, 90.0]]
    # forgetting: task 0: max(60, 80) - 40 = 40; task 1: max(70) - 75 = -5 -> 17.5
    assert forgetting(a) == pytest.approx(17.5)
    # bwt: (40 - 60) + (75 - 70) = -15 over 2 -> -7.5
    assert bwt(a) == pytest.approx(-7.5)


def test_forgetting_ignores_the_last_rows_max():
    # the max runs over j <= T-2 only: the final row never counts as the "best" accuracy
    a = [[10.0, None], [30.0, 50.0]]
    assert forgetting(a) == pytest.approx(10.0 - 30.0)
    assert bwt(a) == pytest.approx(20.0)


def test_one_task_has_no_forgetting_or_bwt():
    assert forgetting([[55.0]]) is None and bwt([[55.0]]) is None
    m = ContinualMetrics([(0, 2)])
    m.add(0, [0, 1, 1], [0, 1, 0])
    s = m.summary()
    assert s["forgetting"] is None and s["bwt"] is None
    assert s["acc"] == [pytest.approx(200 / 3)]
    assert s["avg_acc"] == pytest.approx(200 / 3) and s["last_acc"] == pytest.approx(200 / 3)


def test_accuracy_and_mean_class_recall():
    assert metrics.accuracy([0, 1, 1, 2], [0, 1, 0, 0]) == pytest.approx(50.0)
    y, p = [0, 0, 0, 1], [0, 0, 0, 0]
    assert metrics.accuracy(y, p) == pytest.approx(75.0)
    assert metrics.mean_class_recall(y, p) == pytest.approx(50.0)  # (3/3 + 0/1) / 2
    # classes with no sample are left out of the mean
    assert metrics.mean_class_recall(y, p, classes=range(5)) == pytest.approx(50.0)
    # no samples: undefined, None (null in results.json), never NaN
    assert metrics.accuracy([], []) is None and metrics.mean_class_recall([], []) is None


def test_a_task_without_test_images_is_null_with_a_reason_and_left_out_of_the_means(tmp_path):
    """Task 2's classes (2, 3) have no test image: its accuracies are None with the reason under
    `undefined`; forgetting, BWT and the averages use the defined terms; results.json holds no NaN."""
    import json

    from dynammo.io import write_json_atomic

    m = metrics.ContinualMetrics([(0, 2), (2, 4), (4, 6)])
    y1 = np.array([0, 1])
    m.add(0, y1, y1)
    m.add(1, y1, np.array([0, 0]))
    y3 = np.array([0, 1, 4, 5])
    m.add(2, y3, np.array([1, 0, 4, 5]))
    m.add_scores(float("nan"), None)
    s = m.summary()
    assert s["acc_matrix"][1][1] is None and s["acc_matrix"][2][1] is None
    assert s["undefined"]["acc_matrix[1][1]"] == "task 2's classes have no test images"
    assert s["forgetting"] == pytest.approx(100.0)  # task 1 only: max(100, 50) - 0
    assert s["bwt"] == pytest.approx(-100.0)
    assert s["ece"][-1] is None and "ece[2]" in s["undefined"]
    write_json_atomic(tmp_path / "results.json", {**s, "x": [float("inf")]})
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back["x"] == [None] and "x[0]" in back["undefined"] and "acc_matrix[1][1]" in back["undefined"]


def test_confusion_matrix_entries():
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


# Two tasks, bounds (0, 2) and (2, 4).
Y0 = np.array([0, 0, 0, 1, 1])
P0 = np.array([0, 0, 0, 1, 0])
Y1 = np.array([0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
SCORES1 = torch.tensor([
    [5, 1, 0, 0],  # true 0: class-IL 0, task-IL 0
    [1, 2, 9, 0],  # true 0: class-IL 2, task-IL 1 (wrong)
    [0, 4, 1, 0],  # true 1: 1, 1
    [0, 3, 0, 0],  # true 1: 1, 1
    [0, 0, 7, 1],  # true 2: 2, 2
    [0, 0, 6, 2],  # true 2: 2, 2
    [0, 0, 1, 3],  # true 2: 3, 3 (wrong)
    [1, 0, 4, 0],  # true 2: 2, 2
    [0, 0, 0, 5],  # true 3: 3, 3
    [8, 0, 1, 2],  # true 3: class-IL 0 (wrong), task-IL 3 (right)
], dtype=torch.float32)


def test_task_il_predictions_restrict_to_the_true_task():
    til = task_il_predictions(SCORES1, torch.as_tensor(Y1), [(0, 2), (2, 4)])
    assert til.tolist() == [0, 1, 1, 1, 2, 2, 3, 2, 3, 3]
    assert SCORES1.argmax(1).tolist() == [0, 2, 1, 1, 2, 2, 3, 2, 3, 0]


def test_continual_metrics_by_hand():
    m = ContinualMetrics([(0, 2), (2, 4)])
    m.add(0, Y0, P0, extra_preds={"cnn": torch.as_tensor(Y0)})
    assert m.acc_matrix == [[pytest.approx(80.0), None]]
    assert m.acc == [pytest.approx(80.0)]
    assert m.mcr == [pytest.approx(75.0)]  # (3/3 + 1/2) / 2
    assert m.last_confusion.tolist() == [[3, 0], [1, 1]]

    y1 = torch.as_tensor(Y1)
    pred = SCORES1.argmax(1)
    til = task_il_predictions(SCORES1, y1, [(0, 2), (2, 4)])
    m.add(1, y1, pred, til, extra_preds={"cnn": pred})
    # task 0 classes: preds [0, 2, 1, 1] on [0, 0, 1, 1] -> 3/4; task 1: [2, 2, 3, 2, 3, 0] -> 4/6
    assert m.acc_matrix[1] == [pytest.approx(75.0), pytest.approx(400 / 6)]
    # sample-weighted over all 10 samples: 7/10 (not the mean of the two task accuracies)
    assert m.acc[1] == pytest.approx(70.0)
    # class recalls 1/2, 2/2, 3/4, 1/2 -> 68.75
    assert m.mcr[1] == pytest.approx(68.75)
    assert m.task_il_acc == [pytest.approx(80.0)]
    # the extra classifier gets every metric: perfect after task 1, then the headline's predictions
    cnn = m.extra["cnn"]
    assert cnn.acc_matrix == [[100.0, None], [pytest.approx(75.0), pytest.approx(400 / 6)]]
    assert cnn.acc == [100.0, pytest.approx(70.0)] and cnn.mcr[1] == pytest.approx(68.75)
    assert m.last_confusion.tolist() == [
        [1, 0, 1, 0],
        [0, 2, 0, 0],
        [0, 0, 3, 1],
        [1, 0, 0, 1],
    ]
    s = m.summary()
    assert s["avg_acc"] == pytest.approx(75.0) and s["last_acc"] == pytest.approx(70.0)
    assert s["avg_mcr"] == pytest.approx((75.0 + 68.75) / 2) and s["last_mcr"] == pytest.approx(68.75)
    assert s["forgetting"] == pytest.approx(80.0 - 75.0)
    assert s["bwt"] == pytest.approx(75.0 - 80.0)
    assert s["task_il_acc"] == [pytest.approx(80.0)]
    # the mean of the two task accuracies (3/4 and 4/6), not the 7/10 of the images
    assert s["acc_task_mean"] == [pytest.approx(80.0), pytest.approx((75.0 + 400 / 6) / 2)]
    e = s["extra"]["cnn"]
    assert e["avg_acc"] == pytest.approx(85.0) and e["last_acc"] == pytest.approx(70.0)
    assert e["forgetting"] == pytest.approx(100.0 - 75.0) and e["bwt"] == pytest.approx(75.0 - 100.0)
    assert "task_il_acc" not in e
    restored = ContinualMetrics(m.bounds)
    restored.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert restored.summary() == s
    json.dumps(s, allow_nan=False)  # what results.json needs: plain floats and None


def test_task_mean_accuracy_weighs_each_task_alike():
    """acc_task_mean (L2P / DualPrompt / CODA's average accuracy) against the pooled acc, on tasks of
    unequal size: task 1 has 8 test images (classes 0, 1), task 2 has 2 (class 2)."""
    m = ContinualMetrics([(0, 2), (2, 3)])
    m.add(0, [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0])  # 6/8
    y = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    m.add(1, y, [0, 0, 0, 1, 1, 1, 1, 0, 2, 0])  # task 1: 6/8 = 75, task 2: 1/2 = 50
    s = m.summary()
    assert s["acc"] == [pytest.approx(75.0), pytest.approx(70.0)]  # pooled: 7/10 images
    assert s["acc_task_mean"] == [pytest.approx(75.0), pytest.approx(62.5)]  # (75 + 50) / 2
    assert s["avg_acc_task_mean"] == pytest.approx(68.75) and s["last_acc_task_mean"] == pytest.approx(62.5)
    assert s["avg_acc"] == pytest.approx(72.5)
    assert metrics.task_mean_accuracy([[80.0, None], [None, 40.0]]) == [80.0, 40.0]  # an undefined task left out


def test_summary_without_task_il_has_null():
    m = ContinualMetrics([(0, 1), (1, 2)])
    m.add(0, [0, 0], [0, 0])
    assert m.summary()["task_il_acc"] is None
