"""Adapter: PyCIL's own WA (models/wa.py, unchanged) fed the arrays dynammo trains on (export_split.py npz).
Usage: python run_pycil_wa.py SPLIT.npz SEED [clip]   (PyCIL tree on sys.path at /work/scratch/pycil)"""
import sys, json, logging, os
sys.path.insert(0, "/work/scratch/pycil")
import numpy as np, torch
from torchvision import transforms
torch.set_num_threads(1)
import utils.data_manager as dmod
from utils.data import iData
import models.wa as wa

npz, seed = sys.argv[1], int(sys.argv[2])
z = np.load(npz)
mean, std = float(z["mean"][0]), float(z["std"][0])

class iMedNISTArrays(iData):
    use_path = False
    train_trsf = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    test_trsf = [transforms.ToTensor()]
    common_trsf = [transforms.Normalize(mean=(mean,) * 3, std=(std,) * 3)]
    class_order = list(range(6))  # identity order
    def download_data(self):
        rgb = lambda x: np.repeat(x[:, 0, :, :, None], 3, axis=3)  # (N,1,32,32) -> (N,32,32,3) uint8
        self.train_data, self.train_targets = rgb(z["xtr"]), z["ytr"].astype(np.int64)
        self.test_data, self.test_targets = rgb(z["xte"]), z["yte"].astype(np.int64)

dmod._get_idata = lambda name: iMedNISTArrays()
# the recipe: SGD 0.05, momentum 0.9, wd 5e-4, milestones [5, 8], 10 epochs, batch 64, every task
wa.init_epoch = wa.epochs = 10
wa.init_lr = wa.lrate = 0.05
wa.init_milestones = wa.milestones = [5, 8]
wa.init_lr_decay = wa.lrate_decay = 0.1
wa.init_weight_decay = wa.weight_decay = 5e-4
wa.batch_size = 64
wa.num_workers = 0
import models.base as base
base.batch_size = 64
import torch.utils.data as tud
_DL = tud.DataLoader
class DL(_DL):  # no worker processes (2 shared cores)
    def __init__(self, *a, **k):
        k["num_workers"] = 0
        super().__init__(*a, **k)
wa.DataLoader = DL; base.DataLoader = DL
logging.basicConfig(level=logging.INFO, format="%(message)s")

from utils.toolkit import count_parameters
torch.manual_seed(seed); np.random.seed(seed); import random; random.seed(seed)
args = {"memory_size": 120, "memory_per_class": 20, "fixed_memory": False, "device": [torch.device("cpu")],
        "convnet_type": "resnet32", "backbone_type": "resnet32", "model_name": "wa", "dataset": "mednist",
        "init_cls": 2, "increment": 2, "shuffle": False, "seed": seed}
dm = dmod.DataManager("mednist", False, seed, 2, 2)
model = wa.WA(args)
model.topk = 1  # 2 classes at task 1
if len(sys.argv) > 3 and sys.argv[3] == "noalign":  # argv[4]: stop after that many tasks
    from utils.inc_net import IncrementalNet
    IncrementalNet.weight_align = lambda self, inc: None
out = {"cnn": [], "per_class": [], "gamma": []}
_align = type(model._network).weight_align
def align(self, inc):
    w = self.fc.weight.data
    out["gamma"].append(float(w[:-inc].norm(dim=1).mean() / w[-inc:].norm(dim=1).mean()))
    if os.environ.get("PRE_ALIGN_EVAL") and out["gamma"][-1] != 1.0:  # test recall per class before the alignment
        yp, yt = model._eval_cnn(model.test_loader); model._network.train()
        print("BEFORE ALIGN per-class", [float((yp[:, 0][yt == c] == c).mean() * 100) for c in range(model._total_classes)], flush=True)
    return _align(self, inc)
type(model._network).weight_align = align
import os
if os.environ.get("LOAD_T1"):  # the swap: task 1's network trained by dynammo, loaded instead of trained
    sys.path.insert(0, "/work/scratch/swap")
    from convert import dynammo_to_pycil
    _train = model._train
    def _train_or_load(train_loader, test_loader):
        if model._cur_task == 0:
            sd = torch.load(os.environ["LOAD_T1"])  # dynammo's keys (backbone.*) or PyCIL's own
            if any(k.startswith("backbone.") for k in sd):
                r = model._network.load_state_dict(dynammo_to_pycil(sd), strict=False)
                assert r.missing_keys == ["convnet.fc.weight", "convnet.fc.bias"] and not r.unexpected_keys, r
            else:
                model._network.load_state_dict(sd, strict=True)
            print("loaded task-1 network", os.environ["LOAD_T1"], flush=True)
        else:
            torch.manual_seed(seed); np.random.seed(seed); random.seed(seed)  # task 2's draws from the seed
            _train(train_loader, test_loader)
    model._train = _train_or_load
for task in range(dm.nb_tasks):
    model.incremental_train(dm)
    if task == 0 and os.environ.get("SAVE_T1"):
        torch.save(model._network.state_dict(), os.environ["SAVE_T1"])
    y_pred, y_true = model._eval_cnn(model.test_loader)
    pred = y_pred[:, 0]
    acc = float((pred == y_true).mean() * 100)
    per = [float((pred[y_true == c] == c).mean() * 100) for c in range(model._total_classes)]
    out["cnn"].append(round(acc, 2)); out["per_class"].append([round(p, 1) for p in per])
    print("TASK", task, "cnn", round(acc, 2), "per-class", per, "confusion", np.bincount(pred[y_true == 0], minlength=6).tolist(), flush=True)
    if task == 0:  # memory after task 1
        print("memory labels", np.bincount(model._targets_memory.astype(int)).tolist())
    print('row norms', model._network.fc.weight.data.norm(dim=1).tolist(), 'bias', model._network.fc.bias.data.tolist(), flush=True)
    model.after_task()
    if task == 0:
        def logits(ds):
            model._old_network.eval(); outs = []
            with torch.no_grad():
                for _, x, y in DL(ds, batch_size=256, shuffle=False):
                    outs.append(model._old_network(x)["logits"])
            return torch.cat(outs)
        mem = dm.get_dataset([], source="train", mode="test", appendent=model._get_memory())
        lm = logits(mem); ym = torch.as_tensor(model._targets_memory.astype(int))
        print("teacher logits on memory: mean per class", [lm[ym == c].mean(0).tolist() for c in (0, 1)])
        for c in (2, 3):
            lc = logits(dm.get_dataset([c], source="train", mode="test"))
            print("teacher on class", c, "mean", lc.mean(0).tolist(), "argmax counts", torch.bincount(lc.argmax(1), minlength=2).tolist(), "mean |margin|", (lc[:,0]-lc[:,1]).abs().mean().item())
    if len(sys.argv) > 4 and task + 1 >= int(sys.argv[4]):
        break
print("RESULT", json.dumps(out))
