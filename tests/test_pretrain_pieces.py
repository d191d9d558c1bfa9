"""`dynammo pretrain`'s pieces on hand-made inputs: the SSL losses and MoCo's state, the k-NN monitor
and the collapse measure, the batched views."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from dynammo.data.crops import crop_boxes, crop_flip_resize
from dynammo.pretrain.augment import TwoViews, hsv_to_rgb, preset, rgb_to_hsv
from dynammo.pretrain.knn import feature_spread, feature_std, knn_accuracy, knn_predict
from dynammo.pretrain.losses import KeyQueue, info_nce, momentum_update_, negative_cosine, simsiam_loss
from dynammo.pretrain.models import MoCoV2


# ---------------------------------------------------------------- losses on hand-made inputs


def test_simsiam_negative_cosine_value_and_stop_gradient():
    p1 = torch.tensor([[1.0, 0.0], [3.0, 4.0]], requires_grad=True)
    p2 = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    z1 = torch.tensor([[2.0, 0.0], [0.0, 5.0]], requires_grad=True)
    z2 = torch.tensor([[0.0, 1.0], [4.0, 3.0]], requires_grad=True)
    # cos(p1, z2): 0 and (12 + 12) / 25 = 0.96; cos(p2, z1): 1/sqrt(2) and 1
    d12 = -(0.0 + 0.96) / 2
    d21 = -(1 / math.sqrt(2) + 1.0) / 2
    loss = simsiam_loss(p1, p2, z1, z2)
    assert loss.item() == pytest.approx(0.5 * d12 + 0.5 * d21, abs=1e-7)
    assert negative_cosine(p1, z2).item() == pytest.approx(d12, abs=1e-7)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # no gradient through the target branch
    assert p1.grad is not None and p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    # the gradient of D(p, sg(z)) w.r.t. p, by hand: -(z/|z| - cos * p/|p|) / |p| / B, halved
    p, z = p1.detach()[1], z2.detach()[1]
    cos = 0.96
    expected = -0.5 * (z / z.norm() - cos * p / p.norm()) / p.norm() / 2
    assert torch.allclose(p1.grad[1], expected, atol=1e-7)
    z2.grad = None
    simsiam_loss(p1, p2, z1, z2, stop_gradient=False).backward()
    assert z2.grad is not None and z2.grad.abs().sum() > 0  # the ablation lets it through


def test_info_nce_with_the_queue_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    t = 0.5
    loss, logits = info_nce(q, k, queue, t)
    rows = [[0.6, 1.0, 0.0, -1.0], [1.0, 0.0, 1.0, 0.0]]  # positive first, then q . queue
    assert torch.allclose(logits, torch.tensor(rows) / t)
    by_hand = [-math.log(math.exp(r[0] / t) / sum(math.exp(v / t) for v in r)) for r in rows]
    assert loss.item() == pytest.approx(sum(by_hand) / 2, abs=1e-6)
    k.requires_grad_(True)
    queue.requires_grad_(True)
    info_nce(q, k, queue, t)[0].backward()
    assert k.grad is None and queue.grad is None and q.grad is not None


def test_momentum_update_of_the_key_encoder_exact_values():
    query, key = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        query.weight.copy_(torch.tensor([[8.0, -4.0]]))
        query.bias.fill_(2.0)
        key.weight.copy_(torch.tensor([[4.0, 4.0]]))
        key.bias.fill_(-2.0)
    momentum_update_(key, query, 0.75)  # 0.75 k + 0.25 q, exact in binary
    assert key.weight.tolist() == [[5.0, 2.0]] and key.bias.tolist() == [-1.0]
    assert query.weight.tolist() == [[8.0, -4.0]]  # the query encoder is untouched


def backbone_stub(out_dim=2):
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, out_dim))
    net.out_dim = out_dim
    return net


def test_moco_key_encoder_follows_the_query_encoder_and_never_trains():
    model = MoCoV2(backbone_stub(), queue_size=4, dim=2, hidden_dim=2, momentum=0.5, bn_groups=1)
    assert all(not p.requires_grad for p in model.key_encoder().parameters())
    assert {id(p) for p in model.trainable()}.isdisjoint(id(p) for p in model.key_encoder().parameters())
    before = [p.detach().clone() for p in model.key_encoder().parameters()]
    with torch.no_grad():
        for p in model.query_encoder().parameters():
            p.add_(1.0)
    query = [p.detach().clone() for p in model.query_encoder().parameters()]
    model.after_step()
    for k, k0, q in zip(model.key_encoder().parameters(), before, query):
        assert torch.equal(k, 0.5 * k0 + 0.5 * q)


def test_queue_is_first_in_first_out():
    queue = KeyQueue(6, 2, torch.Generator().manual_seed(0))
    batches = [torch.tensor([[float(i), float(i)]] * 1) for i in range(8)]
    pushed = []
    for b in range(4):  # batches of 2 keys: 0-1, 2-3, 4-5, 6-7
        keys = torch.cat(batches[2 * b:2 * b + 2])
        queue.push(keys)
        pushed.append(keys)
    assert int(queue.ptr) == 2  # 8 keys into 6 slots: the oldest two (0, 1) were replaced by 6, 7
    assert queue.oldest_first()[:, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert queue.keys[:, 0].tolist() == [6.0, 7.0, 2.0, 3.0, 4.0, 5.0]
    queue.push(torch.tensor([[8.0, 8.0], [9.0, 9.0], [10.0, 10.0]]))  # wraps round the end
    assert queue.oldest_first()[:, 0].tolist() == [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]


def test_moco_pushes_the_batch_keys_after_the_step():
    torch.manual_seed(0)
    model = MoCoV2(backbone_stub(), queue_size=4, dim=2, hidden_dim=3, momentum=0.99, bn_groups=1)
    start = model.queue.keys.clone()
    x = torch.randn(2, 2)
    loss, logits = model.loss(x, x)
    assert logits.shape == (2, 1 + 4)
    assert torch.equal(model.queue.keys, start)  # the loss used the queue as it was
    keys = model.pending.clone()
    loss.backward()
    model.after_step()
    assert torch.equal(model.queue.keys[:2], keys) and torch.equal(model.queue.keys[2:], start[2:])


# ---------------------------------------------------------------- the monitor


def test_knn_weighted_and_majority_votes_on_hand_made_features():
    bank = torch.tensor([[1.0, 0.0], [0.5, 0.866], [0.5, -0.866], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])  # cosines 1, 0.5, 0.5, -1
    # majority of the 3 nearest: class 1 (two votes); weighted: e^(1/0.07) > 2 e^(0.5/0.07): class 0
    assert knn_predict(bank, labels, query, 3, 3, "majority").tolist() == [1]
    assert knn_predict(bank, labels, query, 3, 3, "weighted", 0.07).tolist() == [0]
    # k capped to the bank: k=200 sees all 4; with a temperature of 10 the weights are nearly equal: 2 for class 1
    assert knn_predict(bank, labels, query, 200, 3, "weighted", 10.0).tolist() == [1]
    queries = torch.tensor([[2.0, 0.0], [-3.0, 0.1], [0.4, 0.9]])
    assert knn_accuracy(bank, labels, queries, torch.tensor([0, 2, 0]), 1, 3) == pytest.approx(200 / 3)


def test_feature_std_measures_collapse():
    collapsed = torch.ones(10, 4) + 1e-9 * torch.arange(40.0).view(10, 4)
    assert feature_std(collapsed) < 1e-8 and feature_spread(collapsed) < 1e-7
    onehot = torch.eye(4)  # 4 images on 4 orthogonal axes: std per dimension sqrt(1/4 - 1/16)
    assert feature_std(onehot) == pytest.approx(math.sqrt(3 / 16))
    assert feature_spread(onehot) == pytest.approx(math.sqrt(3 / 16) * 2)
    assert feature_std(3.0 * onehot) == pytest.approx(feature_std(onehot))  # of the l2-normalised features


# ---------------------------------------------------------------- the views


def test_full_box_crop_is_the_identity_and_flip_mirrors():
    x = torch.rand(2, 3, 8, 8)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2, dtype=torch.float64)
    out = crop_flip_resize(x, boxes, torch.tensor([False, True]))
    assert torch.allclose(out[0], x[0], atol=1e-6) and torch.allclose(out[1], x[1].flip(-1), atol=1e-6)
    b = crop_boxes(500, 16, 12, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    top, left, h, w = b.t()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 16).all() and (left + w <= 12).all()
    area = h * w / (16 * 12)
    assert area.min() >= 0.15 and area.max() <= 1.0  # integer sides round a 0.2 share of a small image


def test_hsv_round_trip():
    x = torch.rand(3, 3, 5, 5)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)


def test_views_are_reproducible_from_the_generator_and_differ_from_each_other():
    raw = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    views = TwoViews(preset("natural"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    a1, a2 = views(raw, torch.Generator().manual_seed(3))
    b1, b2 = views(raw, torch.Generator().manual_seed(3))
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, a2)
    assert a1.shape == (4, 3, 16, 16) and a1.dtype == torch.float32
    gray = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    med = TwoViews(preset("medical", flip=False), (0.5,), (0.25,))(gray, torch.Generator().manual_seed(0))[0]
    assert med.shape == (4, 3, 16, 16) and torch.equal(med[:, 0], med[:, 2])  # one channel, repeated
