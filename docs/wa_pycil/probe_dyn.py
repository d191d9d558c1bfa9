"""Instrumented dynammo WA on the issue's split: task 1, then look at memory, teacher and task 2 training."""
import sys, torch, numpy as np
torch.set_num_threads(1)
from dynammo.config import load_config
from dynammo.assembly import build_run
import torch.nn.functional as F

seed = int(sys.argv[1]); extra = sys.argv[2:]
cfg = load_config(["mednist_cpu", "wa"], [
    "data_root=/work/shared/data", "backbone=resnet32", "img_size=32", "shuffle=false", f"seed={seed}",
    "max_train_per_class=500", "max_test_per_class=100", "memory_size=120", "sampling_method=herding",
    "opt_type=sgd", "lrate=0.05", "opt_mom=0.9", "weight_decay=0.0005", "scheduler=multi_step", "milestones=[5,8]",
    "lrate_decay=0.1", "epochs=10", "batch_size=64", "amp=false", "progress=false", "device=cpu",
    "wa_preset=reference", "kd_weight=adaptive"] + extra)
import os, dynammo.assembly as asm
draw = os.environ.get("DRAW_SEED")  # other draws (init, batch order, augmentation) on the same split
if draw:
    _se = asm.seed_everything
    asm.seed_everything = lambda s: _se(int(draw))
data, sc, engine, m = build_run(cfg)
if draw:
    engine.generator.manual_seed(int(draw))
    print("draw seed", draw)
tasks = list(sc)
if os.environ.get("PRE_ALIGN_EVAL"):  # test recall per class before the alignment, and gamma
    import dynammo.methods.wa as wamod
    _aw = wamod.align_weights
    def _align_logged(weight, n_old):
        t = tasks[1]; te = sc.test_data_seen(t); m.net.eval()
        with torch.no_grad():
            p = engine.apply(m.net, te).argmax(1)
        m.net.train()
        print("BEFORE ALIGN per-class", [round((p[te.labels == c] == c).float().mean().item() * 100, 1) for c in range(t.end)])
        g = _aw(weight, n_old); print("GAMMA", g); return g
    wamod.align_weights = _align_logged
def logits_of(net, s):
    net.eval()
    with torch.no_grad():
        return engine.apply(net, s)
for t in tasks[:2]:
    engine.begin_task(f"task {t.id+1}")
    m.begin_task(t)
    if t.id == 1:
        mem = m.memory.as_imageset()
        print("memory labels", torch.bincount(mem.labels).tolist())
        tl = logits_of(m.old_net, mem)
        print("teacher logits on memory: mean per class", [tl[mem.labels == c].mean(0).tolist() for c in (0, 1)])
        tr = sc.train_data(t)
        tl2 = logits_of(m.old_net, tr)
        for c in (2, 3):
            lc = tl2[tr.labels == c]
            print("teacher on class", c, "mean", lc.mean(0).tolist(), "argmax counts", torch.bincount(lc.argmax(1), minlength=2).tolist(), "mean |margin|", (lc[:,0]-lc[:,1]).abs().mean().item())
        W = m.net.head.fc.weight; b = m.net.head.fc.bias
        print("row norms at start of task 2", W.norm(dim=1).tolist(), "bias", b.tolist())
        st = logits_of(m.net, mem)
        print("student logits on memory at start", [st[mem.labels == c].mean(0).tolist() for c in (0, 1)])
    if t.id == 0 and os.environ.get("LOAD_T1"):  # the swap: a task-1 network trained by PyCIL, no training here
        sys.path.insert(0, "/work/scratch/swap")
        from convert import pycil_to_dynammo
        sd = torch.load(os.environ["LOAD_T1"])  # PyCIL's keys (convnet.*) or dynammo's own
        m.net.load_state_dict(pycil_to_dynammo(sd) if any(k.startswith("convnet.") for k in sd) else sd, strict=True)
        print("loaded task-1 network", os.environ["LOAD_T1"])
    else:
        if t.id == 1 and os.environ.get("LOAD_T1"):  # task 2's draws from the draw seed, as on the other side
            asm.seed_everything(int(draw)); engine.generator.manual_seed(int(draw))
        m.train_task(t)
    if t.id == 0 and os.environ.get("SAVE_T1"):
        torch.save(m.net.state_dict(), os.environ["SAVE_T1"])
    m.end_task(t)
    m.eval_mode()
    te = sc.test_data_seen(t)
    lg = logits_of(m.net, te)
    pred = lg.argmax(1)
    print("TASK", t.id, "acc", (pred == te.labels).float().mean().item() * 100,
          "confusion rows", [torch.bincount(pred[te.labels == c], minlength=t.end).tolist() for c in range(t.end)])
    print("row norms", m.net.head.fc.weight.norm(dim=1).tolist(), "bias", m.net.head.fc.bias.tolist())
    if t.id == 1:
        mem_lg = logits_of(m.net, m.memory.as_imageset())
