"""Dump the exact arrays dynammo trains on (its MedNIST split, caps, 32 px resize) to an npz for the PyCIL adapter."""
import sys
import numpy as np
import torch
from dynammo.config import load_config
from dynammo.data import load_data
from dynammo.data.scenario import Scenario

seed = int(sys.argv[1]); out = sys.argv[2]
cfg = load_config(["mednist_cpu", "wa"], [
    "data_root=/work/shared/data", "backbone=resnet32", "img_size=32", "shuffle=false", f"seed={seed}",
    "max_train_per_class=500", "max_test_per_class=100"])
data = load_data(cfg, seed)
sc = Scenario.from_config(data, cfg, seed)
def arr(s):
    s = s.materialize()
    return s.images.numpy(), s.labels.numpy()
xtr, ytr = arr(sc.train); xte, yte = arr(sc.test)
print(xtr.shape, xtr.dtype, np.bincount(ytr), np.bincount(yte), sc.class_names, data.mean, data.std, data.flip)
np.savez(out, xtr=xtr, ytr=ytr, xte=xte, yte=yte, mean=np.array(data.mean), std=np.array(data.std),
         names=np.array(sc.class_names))
