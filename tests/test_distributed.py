"""Several processes (torchrun, gloo on this CPU): every rank holds the same model and memory, a
2-process run is the 1-process experiment with the same global batch (BatchNorm included), and an
interrupted 2-process run resumes bit for bit.

Each run is a real `python -m torch.distributed.run --nproc-per-node=2 -m dynammo run ...` (or
tests/dist_cli.py, the CLI in float64). The scenario makes the slices uneven: 9 images per class
and batch_size 7 give global batches of 7 (slices of 4 and 3) and short last batches; task 1's 36
images end with a batch of one image, so the second process's slice is empty (it still takes part
in BatchNorm's collectives)."""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from dynammo.batch import Batch
from dynammo.distributed import World, state_digest
from dynammo.methods.acl import heads_loss
from method_helpers import QUIET, cli_args
from test_cli_e2e import ROOT, wait_for

TINY = cli_args({"dataset": "digits", "init_cls": 4, "increment": 3, "max_train_per_class": 9, "batch_size": 7,
                 "memory_size": 20}, QUIET, amp="false", eval_openset="false")
# BatchNorm trains in every ResNet case: each process normalises its slice with the global batch's statistics
RESNET = ["backbone=resnet20", "img_size=8"]
# LayerNorm: no collective inside the step, and a process with an empty slice skips it
VIT = ["backbone=vit_cpu", "img_size=16", "vit_patch_size=4", "vit_embed_dim=16", "vit_depth=2", "vit_heads=2"]
CASES = {  # name: (method, its keys)
    "replay": ("replay", [*RESNET, "epochs=2"]),
    "icarl": ("icarl", [*RESNET, "epochs=2"]),
    "gem": ("gem", [*RESNET, "epochs=2"]),
    "der_pp": ("der_pp", [*RESNET, "epochs=2"]),  # its replay batches: BatchNorm of the whole replay batch
    "der": ("der", [*RESNET, "epochs=2", "epochs_finetune=1"]),
    # the backbone trains on task 1 (BatchNorm in train mode), then adapters with their own BatchNorm
    "acl": ("acl", [*RESNET, "backbone_epochs=1", "epochs=1", "epochs_finetune=1"]),
    "dynammo": ("dynammo", [*RESNET, "backbone_epochs=0", "epochs=2", "epochs_finetune=1"]),
    "ucir": ("ucir", [*RESNET, "epochs=1"]),
    "podnet": ("podnet", [*RESNET, "epochs=1", "epochs_finetune=1"]),
    "replay_vit": ("replay", [*VIT, "epochs=1"]),
}
FLOAT32_STEPS = {"der_pp", "podnet"}
# the stop-and-resume test, on the methods whose state between steps differs most
RESUMED = ["replay", "icarl", "gem", "der_pp", "der", "dynammo"]


def launch(torchrun, out: Path, case: str, procs: int, *extra: str, float64: bool = True, command: str = "run"):
    entry = [ROOT / "tests" / "dist_cli.py"] if float64 else ["-m", "dynammo"]
    method, keys = CASES[case]
    args = [command, out] if command == "resume" else [command, "--out", out, f"method={method}", *TINY, *keys, *extra]
    return torchrun(procs, *entry, *args)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def final_state(out: Path) -> dict:
    last = max((out / "checkpoints").glob("task_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    return torch.load(last, weights_only=True)["state"]


def tensors(state, prefix=""):
    """Every tensor of a nested state, by path."""
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from tensors(v, f"{prefix}/{i}")


def test_share_splits_a_batch_into_contiguous_uneven_slices():
    assert [World(r, 2).share(7) for r in range(2)] == [(0, 4), (4, 7)]
    assert [World(r, 3).share(2) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]  # the last rank's slice is empty
    assert World().share(5) == (0, 5)


def test_subset_means_of_the_slices_weighted_by_slice_size_give_the_whole_batch_mean():
    """UCIR's margin term averages over the batch's old-class samples: per slice, rescaled, the
    engine's n_slice / n_batch weighting must give the mean over the whole batch's old samples."""
    y = torch.tensor([0, 5, 1, 6, 7, 0, 8])  # classes < 2 are old: 3 of them, at 0, 2 and 5
    losses = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0, 6.0, 0.0])
    old = y < 2
    total = torch.zeros(())
    for rank in range(2):
        start, end = World(rank, 2).share(len(y))
        batch = Batch(torch.zeros(end - start), y[start:end], y[start:end], torch.arange(start, end), global_y=y)
        local_old = old[start:end]
        local_mean = losses[start:end][local_old].mean()
        total = total + (end - start) / len(y) * batch.subset_mean(local_mean, int(local_old.sum()), int(old.sum()))
    assert float(total) == pytest.approx((1.0 + 2.0 + 6.0) / 3)
    one = Batch(torch.zeros(7), y, y, torch.arange(7))  # one process: the plain mean, untouched
    assert one.subset_mean(torch.tensor(4.0), 3, 3) == torch.tensor(4.0)


def test_a_head_counts_when_the_whole_batch_holds_its_task_even_if_the_slice_does_not():
    logits = [torch.zeros(2, 3), torch.zeros(2, 3)]  # heads of tasks (0, 2) and (2, 4), 2 classes + others
    slice_y = torch.tensor([0, 1])
    only_first = heads_loss(logits, slice_y, [(0, 2), (2, 4)])
    both = heads_loss(logits, slice_y, [(0, 2), (2, 4)], batch_labels=torch.tensor([0, 1, 3]))
    assert float(only_first) == pytest.approx(math.log(3)) and float(both) == pytest.approx(2 * math.log(3))


def test_state_digest_tells_equal_states_from_states_one_bit_apart():
    state = {"net": {"w": torch.arange(6.0).view(2, 3), "n": torch.tensor(3)}, "memory": [torch.ones(2)], "k": 4}
    same = {"k": 4, "memory": [torch.ones(2)], "net": {"n": torch.tensor(3), "w": torch.arange(6.0).view(2, 3)}}
    assert state_digest(state) == state_digest(same)
    moved = {**state, "net": {**state["net"], "w": state["net"]["w"].clone()}}
    moved["net"]["w"][1, 2] = torch.nextafter(moved["net"]["w"][1, 2], torch.tensor(10.0))
    assert state_digest(moved) != state_digest(state)
    assert state_digest({**state, "k": 5}) != state_digest(state)


@pytest.fixture(scope="module")
def pairs(torchrun, tmp_path_factory):
    """For every case: a 1-process and a 2-process float64 run of the same config."""
    root = tmp_path_factory.mktemp("dist")
    done = {}
    for case in CASES:
        one, two = root / f"{case}_1", root / f"{case}_2"
        finish(launch(torchrun, two, case, 2))
        finish(launch(torchrun, one, case, 1))
        done[case] = (one, two)
    return done


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_holds_the_same_model_memory_and_rngs_after_every_task(pairs, case):
    r = results(pairs[case][1])
    assert r["world_size"] == 2 and r["status"] == "complete"
    assert len(r["rank_digests"]) == 3
    for task, digests in enumerate(r["rank_digests"]):
        assert len(digests) == 2 and digests[0] == digests[1], f"task {task + 1}: ranks differ"
    assert "rank_digests" not in results(pairs[case][0]) and results(pairs[case][0])["world_size"] == 1


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_the_one_process_experiment(pairs, case):
    """BatchNorm included: each process normalises its slice with the whole global batch's
    statistics, so parameters, running statistics and memories equal one process's."""
    one, two = pairs[case]
    a, b = dict(tensors(final_state(one))), dict(tensors(final_state(two)))
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            # float64: only the summation order of the gradients and of BatchNorm's sums differs,
            # amplified over the steps (observed: up to 1e-10). What passes through float32 (DER++'s
            # stored logits, which steer its training; PODNet's losses, computed in float32):
            # rounding of float32, amplified (observed: 3e-7 for PODNet).
            tol = 1e-5 if case in FLOAT32_STEPS or a[key].dtype == torch.float32 else 1e-8
            assert torch.allclose(a[key], b[key], rtol=0, atol=tol), f"{key}: {(a[key] - b[key]).abs().max()}"
        else:  # exemplar images, labels, indices, counters: identical
            assert torch.equal(a[key], b[key]), key
    ra, rb = results(one), results(two)
    assert ra["acc_matrix"] == rb["acc_matrix"] and ra["acc"] == rb["acc"]
    assert [c["memory_exemplars"] for c in ra["cost"]] == [c["memory_exemplars"] for c in rb["cost"]]


@pytest.mark.parametrize("case", RESUMED)
def test_a_stopped_two_process_run_resumes_bit_for_bit(torchrun, pairs, tmp_path, case):
    """SIGTERM to torchrun reaches both ranks at different batches; they agree on one stop batch,
    rank 0 saves, and `torchrun ... dynammo resume` ends where the uninterrupted run ended."""
    out = tmp_path / "stopped"
    proc = launch(torchrun, out, case, 2, "checkpoint_every=1")
    wait_for(out / "log.txt", "task 2/3", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    r = results(out)
    assert r["status"] == "interrupted", r.get("stopped_because")
    assert (out / "checkpoints" / "task_0.pt").is_file()
    finish(launch(torchrun, out, case, 2, command="resume"))
    uninterrupted = pairs[case][1]
    assert results(out)["acc_matrix"] == results(uninterrupted)["acc_matrix"]
    assert results(out)["rank_digests"] == results(uninterrupted)["rank_digests"]
    a, b = dict(tensors(final_state(out))), dict(tensors(final_state(uninterrupted)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_method_that_cannot_train_distributed_says_so_in_one_line(torchrun, tmp_path):
    proc = torchrun(2, "-m", "dynammo", "run", "--out", tmp_path / "l2p", "method=l2p", *TINY, *VIT,
                    "batchwise_prompt=true", "epochs=1")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert "error: method 'l2p' cannot train on several processes: batchwise_prompt=true" in err
    assert not (tmp_path / "l2p").exists()
