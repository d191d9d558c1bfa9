"""Engine: optimiser settings, devices, the shared fit loop and its error paths."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.compute import resolve_device
from dynammo.configure import load_config
from dynammo.console import Console
from dynammo.data.imageset import ImageSet
from dynammo.data.transforms import BatchTransform
from dynammo.engine import Engine
from dynammo.errors import UserError
from dynammo.optim import OptimSettings


def make_engine(*overrides):
    cfg = load_config(None, ["progress=false", *overrides])
    eng = Engine(cfg, Console(progress="false", quiet=True), torch.device("cpu"), seed=0)
    tf = BatchTransform((0.5,), (0.25,))
    eng.set_transforms(tf, tf)
    return eng, cfg


def tiny_data(n=40):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = (labels.view(-1, 1, 1, 1) * 200 + torch.randint(0, 40, (n, 1, 4, 4), generator=g)).to(torch.uint8)
    return ImageSet(labels, images=images)


def test_first_task_uses_reference_init_keys():
    cfg = load_config(None, ["init_epochs=3", "init_lr=0.1", "epochs=2", "lrate=0.01", "init_milestones=[2]"])
    first, later = OptimSettings.from_config(cfg, first_task=True), OptimSettings.from_config(cfg)
    assert (first.epochs, first.lrate, first.milestones) == (3, 0.1, [2])
    assert (later.epochs, later.lrate) == (2, 0.01)
    # stage-specific keys win over the general ones
    cfg["lrate_finetune"] = 0.5
    assert OptimSettings.from_config(cfg, "_finetune").lrate == 0.5


def test_optimisers_and_schedules():
    p = [nn.Parameter(torch.zeros(2))]
    s = OptimSettings(epochs=4, opt_type="adamw", lrate=0.1, scheduler="multi_step", milestones=[1, 3], lrate_decay=0.5)
    opt = s.optimizer(p)
    assert isinstance(opt, torch.optim.AdamW)
    sched = s.schedule(opt)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025])
    assert OptimSettings(epochs=1, scheduler="none").schedule(opt) is None


@pytest.mark.parametrize("name,needle", [("cuda:7", "CUDA"), ("xla", "not supported"), ("tpu", "not valid"), ("gpu:x", "not valid")])
def test_bad_devices(name, needle):
    if name.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UserError, match=needle):
        resolve_device(name)


def test_cpu_and_reference_style_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_fit_learns_and_counts_trained_parameters():
    eng, _ = make_engine()
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    data = tiny_data()
    settings = OptimSettings(epochs=15, opt_type="sgd", lrate=0.1, batch_size=8, scheduler="none")

    def loss(batch):
        logits = net(batch.x)
        return F.cross_entropy(logits, batch.y), logits, batch.y

    stats = eng.fit(net.parameters(), data, loss, settings, augment=False)
    assert stats["acc"] == 100.0 and stats["loss"] < 0.1
    assert sum(eng.trained_params.values()) == 48 * 2 + 2


def test_fit_stops_on_nan_loss_naming_task_and_epoch():
    eng, _ = make_engine()
    eng.task_label = "task 2/3"
    w = nn.Parameter(torch.ones(1))

    def loss(batch):
        return (w * float("nan")).sum(), None, None

    with pytest.raises(UserError, match=r"task 2/3 train epoch 1"):
        eng.fit([w], tiny_data(), loss, OptimSettings(epochs=2, batch_size=8, scheduler="none"))


def test_fit_refuses_empty_data():
    eng, _ = make_engine()
    w = nn.Parameter(torch.ones(1))
    empty = ImageSet(torch.zeros(0, dtype=torch.long), images=torch.zeros(0, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(UserError, match="no training images"):
        eng.fit([w], empty, lambda b: (w.sum(), None, None), OptimSettings(epochs=1))


def test_apply_concatenates_in_order():
    eng, _ = make_engine()
    data = tiny_data(10)
    out = eng.apply(lambda x: {"m": x.mean(dim=(1, 2, 3))}, data, batch_size=3)
    expect = ((data.images.float() / 255 - 0.5) / 0.25).mean(dim=(1, 2, 3))
    assert torch.allclose(out["m"], expect, atol=1e-5)
