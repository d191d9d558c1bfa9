"""BatchNorm over the global batch (global_batchnorm.py) on 2 gloo processes, against torch's
nn.BatchNorm on the whole batch in one process: forward values, running statistics, input and
parameter gradients, for uneven slices (7 = 4 + 3) and an empty one (1 = 1 + 0).

Both processes are real (torch.multiprocessing, gloo over a file store); each saves what it
computed for its slice, and the test compares the slices put together with the one-process layer."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from dynammo.distributed import World
from dynammo.global_batchnorm import shared_pass, training_step

CASES = {  # name: (layer class, shape of the global batch)
    "2d_7": (nn.BatchNorm2d, (7, 3, 4, 5)),
    "2d_1": (nn.BatchNorm2d, (1, 3, 4, 5)),  # the second process's slice is empty
    "1d_7": (nn.BatchNorm1d, (7, 6)),
}
STEPS = 2  # two steps: the second normalises with weights and running stats the first one changed


def data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1.5
    upstream = torch.randn(*shape, generator=g, dtype=torch.float64)  # d loss / d output
    return x, upstream


def layer(cls, channels):
    torch.manual_seed(0)
    bn = cls(channels).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    return bn


def run_steps(bn, slices, shared=False, world=None):
    """STEPS forward/backward passes; per step: output, input gradient, weight and bias gradients
    (this slice's; `world` sums them over processes before the SGD step, as the engine does)."""
    out = []
    for step, (x, upstream) in enumerate(slices):
        x = x.clone().requires_grad_(True)
        bn.zero_grad(set_to_none=True)
        if shared:
            with shared_pass():
                y = bn(x)
        else:
            y = bn(x)
        (y * upstream).sum().backward()
        out.append({"y": y.detach(), "dx": x.grad.detach(), "dw": bn.weight.grad.detach().clone(),
                    "db": bn.bias.grad.detach().clone()})
        with torch.no_grad():  # a step of plain SGD so the second pass sees other weights
            for p in (bn.weight, bn.bias):
                p -= 0.1 * (world.sum_(p.grad.clone()) if world is not None else p.grad)
    return out


def worker(rank, store, results):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    world = World(rank, 2)
    saved = {}
    for name, (cls, shape) in CASES.items():
        start, end = world.share(shape[0])
        bn = layer(cls, shape[1])
        batches = [data(shape, seed) for seed in range(STEPS)]
        with training_step(world):
            steps = run_steps(bn, [(x[start:end], up[start:end]) for x, up in batches], world=world)
        saved[name] = {"steps": steps, "running_mean": bn.running_mean, "running_var": bn.running_var,
                       "tracked": bn.num_batches_tracked}
        # inside shared_pass every process normalises its own (whole) batch, as one process
        local = layer(cls, shape[1])
        with training_step(world):
            saved[name]["shared"] = run_steps(local, batches, shared=True)
    torch.save(saved, f"{results}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(spawn_processes, tmp_path_factory):
    root = tmp_path_factory.mktemp("global_bn")
    spawn_processes(worker, (str(root / "store"), str(root)), nprocs=2)
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", list(CASES))
def test_two_slices_compute_the_whole_batch_batchnorm(ranks, name):
    cls, shape = CASES[name]
    bn = layer(cls, shape[1])
    whole = run_steps(bn, [data(shape, seed) for seed in range(STEPS)])
    for step in range(STEPS):
        parts = [r[name]["steps"][step] for r in ranks]
        assert parts[1]["y"].shape[0] == shape[0] - parts[0]["y"].shape[0]
        for key in ("y", "dx"):  # each slice's rows are the whole batch's rows
            got = torch.cat([p[key] for p in parts])
            assert torch.allclose(got, whole[step][key], rtol=0, atol=1e-12), (step, key)
        for key in ("dw", "db"):  # the slices' parameter gradients add up to the whole batch's
            got = parts[0][key] + parts[1][key]
            assert torch.allclose(got, whole[step][key], rtol=0, atol=1e-12), (step, key)
    for r in ranks:  # the running statistics come from the global batch, the same on both processes
        assert torch.allclose(r[name]["running_mean"], bn.running_mean, rtol=0, atol=1e-12)
        assert torch.allclose(r[name]["running_var"], bn.running_var, rtol=0, atol=1e-12)
        assert int(r[name]["tracked"]) == STEPS


@pytest.mark.parametrize("name", list(CASES))
def test_a_shared_pass_is_the_one_process_batchnorm_on_every_process(ranks, name):
    cls, shape = CASES[name]
    whole = run_steps(layer(cls, shape[1]), [data(shape, seed) for seed in range(STEPS)])
    for r in ranks:
        for step in range(STEPS):
            for key in ("y", "dx", "dw", "db"):
                assert torch.equal(r[name]["shared"][step][key], whole[step][key]), (step, key)


def test_the_slice_statistics_differ_from_the_global_ones():
    """What the global layer fixes: a slice's own statistics are not the whole batch's."""
    x, _ = data(CASES["2d_7"][1], 0)
    bn = layer(nn.BatchNorm2d, 3)
    assert not torch.allclose(bn(x[:4]), bn(x)[:4], atol=1e-3)
