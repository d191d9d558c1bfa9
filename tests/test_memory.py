"""Exemplar memory: selection order, budget policy, truncation, reservoir buffer."""
from __future__ import annotations

import pytest
import torch

from dynammo.data.imageset import ImageSet
from dynammo.data.memory import (ExemplarMemory, ReservoirBuffer, balanced_set, closest_to_mean, herding, select)
from dynammo.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")

# Four unit vectors (so L2 normalisation leaves them as they are); their mean is (0.64, 0.52).
A, B, C, D = (1.0, 0.0), (0.0, 1.0), (0.6, 0.8), (0.96, 0.28)
FEATS = torch.tensor([A, B, C, D])


def test_herding_order_by_hand():
    # k=1: |mu - x|^2 = a 0.40, b 0.64, c 0.08, d 0.16 -> c (index 2)
    # k=2: |mu - (c + x)/2|^2 = a 0.04, b 0.26, d 0.02 -> d (index 3)
    # k=3: |mu - (c + d + x)/3|^2 = a 0.0711, b 0.0444 -> b (index 1), then a
    assert herding(FEATS, 2).tolist() == [2, 3]
    assert herding(FEATS, 4).tolist() == [2, 3, 1, 0]
    assert herding(FEATS, 10).tolist() == [2, 3, 1, 0]  # m larger than the class: everything, no repeats


def test_herding_uses_l2_normalised_features():
    scaled = FEATS * torch.tensor([[5.0], [0.1], [3.0], [0.5]])
    assert herding(scaled, 4).tolist() == [2, 3, 1, 0]


def test_closest_to_mean_order():
    # distances to the mean: a 0.40, b 0.64, c 0.08, d 0.16 (herding differs at the 3rd pick)
    assert closest_to_mean(FEATS, 4).tolist() == [2, 3, 0, 1]
    assert closest_to_mean(FEATS, 1).tolist() == [2]


def _class_data(n_classes=4, per_class=4, shape=(1, 2, 2)):
    """Image i holds the constant value i, so which images were kept is visible."""
    n = n_classes * per_class
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, *shape).contiguous()
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return ImageSet(labels, images=images)


def _features(data: ImageSet) -> torch.Tensor:
    """Image value i -> FEATS[i % 4]: every class of 4 images looks like FEATS."""
    return FEATS[data.images[:, 0, 0, 0].long() % 4]


def _kept(mem: ExemplarMemory, c: int) -> list:
    return mem.per_class[c].images[:, 0, 0, 0].tolist()


def test_select_dispatch():
    data = _class_data(1)
    assert select("herding", data, 3, _features, None).tolist() == [2, 3, 1]
    assert select("closest_to_mean", data, 3, _features, None).tolist() == [2, 3, 0]
    g = torch.Generator().manual_seed(0)
    picked = select("random", data, 3, None, g)
    assert len(set(picked.tolist())) == 3 and all(0 <= i < 4 for i in picked.tolist())
    with pytest.raises(ValueError):
        select("herding", data, 2, None, None)


def test_fixed_total_budget_truncates_in_selection_order():
    data = _class_data(4)
    mem = ExemplarMemory(memory_size=6, sampling_method="herding")
    mem.update(data, [0, 1], n_seen=2, features_fn=_features)  # 6 // 2 = 3 per class
    assert mem.quota(2) == 3
    assert _kept(mem, 0) == [2, 3, 1]  # herding order of class 0 (images 0..3)
    assert _kept(mem, 1) == [6, 7, 5]  # class 1 holds images 4..7
    assert len(mem) == 6
    assert mem.per_class[1].labels.tolist() == [1, 1, 1]

    mem.update(data, [2, 3], n_seen=4, features_fn=_features)  # 6 // 4 = 1 per class
    assert _kept(mem, 0) == [2] and _kept(mem, 1) == [6]  # the prefix of the earlier selection
    assert _kept(mem, 2) == [10] and _kept(mem, 3) == [14]
    assert len(mem) == 4
    merged = mem.as_imageset()
    assert merged.labels.tolist() == [0, 1, 2, 3]
    assert merged.images[:, 0, 0, 0].tolist() == [2, 6, 10, 14]


def test_random_selection_prefix_is_kept():
    data = _class_data(4, per_class=6)
    mem = ExemplarMemory(memory_size=8, sampling_method="random")
    g = torch.Generator().manual_seed(3)
    mem.update(data, [0, 1], n_seen=2, generator=g)
    first = {c: _kept(mem, c) for c in (0, 1)}
    assert len(first[0]) == 4 and set(first[0]) <= set(range(0, 6)) and len(set(first[0])) == 4
    assert set(first[1]) <= set(range(6, 12))
    mem.update(data, [2, 3], n_seen=4, generator=g)
    assert _kept(mem, 0) == first[0][:2] and _kept(mem, 1) == first[1][:2]
    assert all(len(mem.per_class[c]) == 2 for c in range(4))


def test_memory_per_class_overrides_the_total():
    data = _class_data(4)
    mem = ExemplarMemory(memory_size=0, memory_per_class=3, sampling_method="herding")
    assert mem.enabled
    mem.update(data, [0, 1], n_seen=2, features_fn=_features)
    mem.update(data, [2, 3], n_seen=4, features_fn=_features)
    assert [len(mem.per_class[c]) for c in range(4)] == [3, 3, 3, 3]
    assert _kept(mem, 0) == [2, 3, 1]


def test_disabled_memory_keeps_nothing():
    mem = ExemplarMemory(memory_size=0)
    assert not mem.enabled
    mem.update(_class_data(2), [0, 1], n_seen=2, features_fn=_features)
    assert len(mem) == 0 and mem.nbytes == 0


def test_check_budget():
    with pytest.raises(UserError) as exc:
        ExemplarMemory(memory_size=5).check_budget(10)
    assert "memory_size=5" in str(exc.value) and "10" in str(exc.value)
    ExemplarMemory(memory_size=10).check_budget(10)
    ExemplarMemory(memory_size=5, memory_per_class=1).check_budget(10)
    ExemplarMemory(memory_size=0).check_budget(10)  # no memory at all is not a budget problem


def test_nbytes_is_exemplars_times_image_size():
    data = _class_data(2, per_class=4, shape=(3, 5, 7))
    mem = ExemplarMemory(memory_size=6, sampling_method="herding")
    mem.update(data, [0, 1], n_seen=2, features_fn=_features)
    assert len(mem) == 6
    assert mem.nbytes == 6 * 3 * 5 * 7


def test_from_config_and_state_dict_round_trip(make_cfg):
    cfg = make_cfg(memory_size=4, sampling_method="closest_to_mean")
    mem = ExemplarMemory.from_config(cfg)
    assert (mem.memory_size, mem.memory_per_class, mem.sampling_method) == (4, None, "closest_to_mean")
    mem.update(_class_data(2), [0, 1], n_seen=2, features_fn=_features)
    assert _kept(mem, 0) == [2, 3]
    other = ExemplarMemory(4, None, "closest_to_mean")
    other.load_state_dict(mem.state_dict())
    assert _kept(other, 0) == [2, 3] and _kept(other, 1) == [6, 7]
    assert torch.equal(other.as_imageset().labels, mem.as_imageset().labels)


def test_balanced_set_has_m_per_class():
    data = _class_data(4)
    mem = ExemplarMemory(memory_size=6, sampling_method="herding")
    mem.update(data, [0, 1], n_seen=2, features_fn=_features)
    bal = balanced_set(mem, data, [2, 3], m=2, features_fn=_features)
    counts = torch.bincount(bal.labels, minlength=4).tolist()
    assert counts == [2, 2, 2, 2]
    values = dict()
    for v, y in zip(bal.images[:, 0, 0, 0].tolist(), bal.labels.tolist()):
        values.setdefault(y, []).append(v)
    assert values[0] == [2, 3] and values[1] == [6, 7]  # first m exemplars of old classes
    assert values[2] == [10, 11] and values[3] == [14, 15]  # herding picks for new classes
    assert len(mem) == 6  # the memory itself is untouched


def _stream(n, start=0, shape=(1, 2, 2)):
    vals = torch.arange(start, start + n)
    images = vals.view(n, 1, 1, 1).expand(n, *shape).to(torch.int64).contiguous()
    return images, vals


def test_reservoir_fills_first_slots_in_order_and_keeps_capacity():
    buf = ReservoirBuffer(5)
    x, y = _stream(3)
    buf.add(x, y, logits=torch.stack([y.float(), -y.float()], 1))
    assert len(buf) == 3 and buf.seen == 3
    x, y = _stream(2, start=3)
    buf.add(x, y, logits=torch.stack([y.float(), -y.float()], 1))
    assert len(buf) == 5
    assert buf.labels.tolist() == [0, 1, 2, 3, 4]
    assert buf.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert buf.extras["logits"].tolist() == [[float(i), -float(i)] for i in range(5)]

    g = torch.Generator().manual_seed(0)
    x, y = _stream(100, start=5)
    buf.add(x, y, generator=g, logits=torch.stack([y.float(), -y.float()], 1))
    assert len(buf) == 5 and buf.seen == 105 and buf.images.shape[0] == 5
    # every slot still holds one consistent (image, label, extra) triple
    assert torch.equal(buf.images[:, 0, 0, 0], buf.labels)
    assert torch.equal(buf.extras["logits"][:, 0], buf.labels.float())
    assert buf.nbytes == 5 * (4 * 8 + 2 * 4)  # 5 slots: a 1x2x2 int64 image + 2 float32 logits

    imgs, labels, extras = buf.sample(3, generator=g)
    assert len(labels) == 3 and torch.equal(imgs[:, 0, 0, 0], labels)
    assert torch.equal(extras["logits"][:, 0], labels.float())


def test_reservoir_pads_narrower_extras_and_grows_for_wider_ones():
    buf = ReservoirBuffer(4)
    buf.add(*_stream(2), logits=torch.ones(2, 3))
    buf.add(*_stream(1, start=2), logits=torch.full((1, 2), 7.0))  # narrower: zero-padded
    buf.add(*_stream(1, start=3), logits=torch.full((1, 5), 9.0))  # wider: e.g. after the head grew
    lg = buf.extras["logits"]
    assert lg.shape == (4, 5)
    assert lg[0].tolist() == [1, 1, 1, 0, 0]
    assert lg[2].tolist() == [7, 7, 0, 0, 0]
    assert lg[3].tolist() == [9] * 5


def test_reservoir_is_uniform_over_the_stream():
    # Vitter's algorithm R: every item of the stream ends up in the buffer with probability capacity/n
    counts = torch.zeros(40)
    for seed in range(150):
        buf = ReservoirBuffer(8)
        buf.add(*_stream(40), generator=torch.Generator().manual_seed(seed))
        counts[buf.labels] += 1
    expected = 150 * 8 / 40  # 30 per item
    assert counts.sum() == 150 * 8
    assert abs(counts[:10].mean() - expected) < 6 and abs(counts[-10:].mean() - expected) < 6


def test_reservoir_needs_capacity():
    with pytest.raises(UserError, match="memory_size"):
        ReservoirBuffer(0)
