"""Task splits, class orders, label remapping and dataset-per-task streams."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dynammo.data import LoadedData, load_data
from dynammo.data.imageset import ImageSet
from dynammo.data.scenario import Scenario, make_class_order, task_sizes
from dynammo.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- task sizes


@pytest.mark.parametrize("n, init, inc, sizes", [
    (10, 2, 2, [2, 2, 2, 2, 2]),
    (10, 4, 3, [4, 3, 3]),
    (10, 10, 5, [10]),
    (6, 1, 5, [1, 5]),
])
def test_task_sizes_from_increment(n, init, inc, sizes):
    assert task_sizes(n, init, inc) == sizes


def test_task_sizes_from_list():
    assert task_sizes(10, 2, [3, 3, 4]) == [3, 3, 4]  # the list gives every task, init_cls included


def test_non_dividing_increment_is_a_user_error():
    with pytest.raises(UserError) as exc:
        task_sizes(10, 2, 3)
    msg = str(exc.value)
    assert "increment=3" in msg and "8" in msg


def test_init_cls_larger_than_dataset():
    with pytest.raises(UserError, match="init_cls=11"):
        task_sizes(10, 11, 1)


def test_list_must_add_up():
    with pytest.raises(UserError, match="add up to 9"):
        task_sizes(10, 2, [3, 3, 3])
    with pytest.raises(UserError, match="add up to 11"):
        task_sizes(10, 2, [4, 4, 3])


# ---------------------------------------------------------------- class order


def test_seeded_class_order_is_reproducible():
    a = make_class_order(10, None, True, 1993)
    assert a == make_class_order(10, None, True, 1993)
    assert sorted(a) == list(range(10))
    assert a != list(range(10))
    assert a != make_class_order(10, None, True, 1994)
    assert a == np.random.RandomState(1993).permutation(10).tolist()  # the seed-compatible (PyCIL) order


def test_unshuffled_and_explicit_class_order():
    assert make_class_order(5, None, False, 1) == [0, 1, 2, 3, 4]
    assert make_class_order(4, [2, 0, 3, 1], True, 1) == [2, 0, 3, 1]  # explicit order wins over shuffle


@pytest.mark.parametrize("order", [[0, 1, 2], [0, 1, 2, 2], [0, 1, 2, 4], [1, 2, 3, 4, 0]])
def test_invalid_class_order(order):
    with pytest.raises(UserError, match="class_order"):
        make_class_order(4, order, False, 1)


# ---------------------------------------------------------------- remapping


def _dataset(n_classes=5, per_class=2):
    """Image value = the dataset class id of the image, so remapping can be checked."""
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    images = labels.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    return ImageSet(labels, images=images)


ORDER = [2, 4, 1, 0, 3]  # not its own inverse, so a mapping the wrong way round shows
NAMES = ["c0", "c1", "c2", "c3", "c4"]


def test_labels_follow_the_class_order():
    train, test = _dataset(), _dataset(per_class=1)
    sc = Scenario(train, test, NAMES, ORDER, [2, 3])
    original = sc.train.images[:, 0, 0, 0].tolist()
    assert sc.train.labels.tolist() == [3, 3, 2, 2, 0, 0, 4, 4, 1, 1]  # dataset class 0 is 4th in ORDER, ...
    assert sc.train.labels.tolist() == [ORDER.index(c) for c in original]
    assert sc.test.labels.tolist() == [ORDER.index(c) for c in sc.test.images[:, 0, 0, 0].tolist()]
    assert sc.class_names == ["c2", "c4", "c1", "c0", "c3"]
    assert [(t.id, t.start, t.end) for t in sc] == [(0, 0, 2), (1, 2, 5)]
    assert len(sc) == 2 and sc.tasks[1].classes == [2, 3, 4] and sc.tasks[1].size == 3
    assert sc.classes_of_tasks() == [[2, 4], [1, 0, 3]]
    # the first task trains on dataset classes 2 and 4 only
    t0 = sc.train_data(sc.tasks[0])
    assert sorted(set(t0.images[:, 0, 0, 0].tolist())) == [2, 4]
    assert sorted(set(t0.labels.tolist())) == [0, 1]
    # the original sets are not modified
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_test_data_seen_and_task_of_label():
    sc = Scenario(_dataset(), _dataset(per_class=3), NAMES, ORDER, [2, 1, 2])
    seen0 = sc.test_data_seen(sc.tasks[0])
    assert sorted(set(seen0.labels.tolist())) == [0, 1] and len(seen0) == 6
    seen1 = sc.test_data_seen(sc.tasks[1])
    assert sorted(set(seen1.labels.tolist())) == [0, 1, 2] and len(seen1) == 9
    assert len(sc.test_data_seen(sc.tasks[2])) == 15
    assert sc.task_of_label(torch.tensor([0, 1, 2, 3, 4])).tolist() == [0, 0, 1, 2, 2]


def _loaded(n=6, stream_sizes=None):
    train, test = _dataset(n), _dataset(n, per_class=1)
    return LoadedData(["x"], [f"c{i}" for i in range(n)], train, test, (0.5,), (0.5,), True, stream_sizes)


def test_scenario_from_config(make_cfg):
    cfg = make_cfg(init_cls=2, increment=2, seed=5)
    sc = Scenario.from_config(_loaded(), cfg, seed=5)
    assert sc.class_order == np.random.RandomState(5).permutation(6).tolist()
    assert [t.size for t in sc] == [2, 2, 2]
    cfg = make_cfg(init_cls=2, increment=[1, 2, 3], class_order=[5, 4, 3, 2, 1, 0])
    sc = Scenario.from_config(_loaded(), cfg, seed=5)
    assert sc.class_order == [5, 4, 3, 2, 1, 0] and [t.size for t in sc] == [1, 2, 3]
    with pytest.raises(UserError):
        Scenario.from_config(_loaded(), make_cfg(init_cls=2, increment=3), seed=5)


def test_stream_scenario_keeps_dataset_order(make_cfg):
    cfg = make_cfg(init_cls=1, increment=1, shuffle=True)  # ignored for a stream: one task per dataset
    sc = Scenario.from_config(_loaded(6, stream_sizes=[4, 2]), cfg, seed=5)
    assert sc.class_order == list(range(6))
    assert [(t.start, t.end) for t in sc] == [(0, 4), (4, 6)]


# ---------------------------------------------------------------- dataset-per-task streams


def test_stream_of_two_medmnist_files(tmp_path, write_npz, make_cfg):
    _, breast = write_npz(tmp_path / "breastmnist.npz", 2, per_class=(3, 1, 2))
    _, blood = write_npz(tmp_path / "bloodmnist.npz", 8, per_class=(2, 1, 1), rgb=True)
    cfg = make_cfg(dataset=["breastmnist", "bloodmnist"], data_root=str(tmp_path), normalize="none")
    data = load_data(cfg, seed=1)
    assert data.names == ["breastmnist", "bloodmnist"]
    assert data.stream_sizes == [2, 8] and data.num_classes == 10
    assert data.class_names[:2] == ["breastmnist/malignant", "breastmnist/normal, benign"]
    assert data.class_names[2] == "bloodmnist/basophil"
    assert data.train.channels == 3  # grayscale parts are repeated to 3 channels
    assert len(data.train) == 6 + 16 and len(data.test) == 4 + 8
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1] + [2 + c for c in range(8) for _ in range(2)]
    breast_imgs = data.train.images[:6]
    assert torch.equal(breast_imgs[:, 0], torch.from_numpy(breast["train_images"]))
    assert torch.equal(breast_imgs[:, 0], breast_imgs[:, 2])
    assert torch.equal(data.train.images[6:], torch.from_numpy(blood["train_images"]).permute(0, 3, 1, 2))

    sc = Scenario.from_config(data, cfg, seed=1)
    assert [(t.start, t.end) for t in sc] == [(0, 2), (2, 10)]
    assert sc.classes_of_tasks() == [[0, 1], list(range(2, 10))]


def test_stream_with_digits_needs_a_common_size(tmp_path, write_npz, make_cfg):
    write_npz(tmp_path / "breastmnist.npz", 2)
    cfg = make_cfg(dataset=["digits", "breastmnist"], data_root=str(tmp_path))
    with pytest.raises(UserError, match="img_size"):
        load_data(cfg, seed=1)
    cfg = make_cfg(dataset=["digits", "breastmnist"], data_root=str(tmp_path), img_size=12)
    data = load_data(cfg, seed=1)
    assert data.stream_sizes == [10, 2] and data.class_names[-1] == "breastmnist/normal, benign"
    assert data.train.images.shape[1:] == (1, 12, 12)
    assert sorted(set(data.test.labels.tolist())) == list(range(12))
