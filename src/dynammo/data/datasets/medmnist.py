"""MedMNIST v3 2D datasets (Yang et al., Scientific Data 2023): one `.npz` per flag and size.

Files: `{flag}.npz` (28 px) or `{flag}_{64|128|224}.npz` in `data_root`, with keys
`train_images, train_labels, val_images, val_labels, test_images, test_labels`.
When the file is missing it is downloaded from the official Zenodo record and its md5 checked
(known for the 28 px files); offline, the error names the expected file and where to get it.
"""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from dynammo.data.datasets import DatasetShape, RawDataset, dataset
from dynammo.data.imageset import ImageSet, stratified_split
from dynammo.data.datasets.files import download_file
from dynammo.errors import UserError

ZENODO = "https://zenodo.org/records/10519652/files/{file}?download=1"

# Official md5 sums of the 28 px files (MedMNIST v3).
MD5_28 = {
    "pathmnist": "a8b06965200029087d5bd730944a56c1",
    "dermamnist": "0744692d530f8e62ec473284d019b0c7",
    "bloodmnist": "7053d0359d879ad8a5505303e11de1dc",
    "breastmnist": "750601b1f35ba3300ea97c75c52ff8f6",
    "pneumoniamnist": "28209eda62fecd6e6a2d98b1501bb15f",
    "retinamnist": "bd4c0672f1bba3e3a89f0e4e876791e4",
    "octmnist": "c68d92d5b585d8d81f7112f81e2d0842",
    "chestmnist": "02c8a6516a18b556561a56cbdd36c4a8",
    "tissuemnist": "ebe78ee8b05294063de985d821c1c34b",
    "organamnist": "68e3f8846a6bd62f0c9bf841c0d9eacc",
    "organcmnist": "b9ceb9546e10131b32923c5bbeaea2b1",
    "organsmnist": "9ab87b696fb54e2a387ebe992d6ed5f1",
}
ORGANS = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
          "lung-left", "lung-right", "pancreas", "spleen"]
CLASS_NAMES = {
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
                   "monocyte", "neutrophil", "platelet"],
    "breastmnist": ["malignant", "normal, benign"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["grade 0", "grade 1", "grade 2", "grade 3", "grade 4"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "chestmnist": ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                   "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                   "pleural", "hernia"],
    "tissuemnist": ["collecting duct, connecting tubule", "distal convoluted tubule",
                    "glomerular endothelial cells", "interstitial endothelial cells", "leukocytes",
                    "podocytes", "proximal tubule segments", "thick ascending limb"],
    "organamnist": ORGANS,
    "organcmnist": ORGANS,
    "organsmnist": ORGANS,
}
FLAGS = tuple(MD5_28)
SIZES = ("", "_64", "_128", "_224")
KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def download(flag: str, file: str, dest: Path) -> None:
    md5 = MD5_28.get(flag) if file == f"{flag}.npz" else None  # known for the 28 px files only
    download_file(ZENODO.format(file=file), dest, md5, f"MedMNIST file {dest.name}")


def read_npz(path: Path, flag: str, keys=KEYS):
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):  # a bare .npy array saved under the .npz name
            raise UserError(f"{path} is a single array, not a MedMNIST .npz archive (expected keys {', '.join(KEYS)})")
        with npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise UserError(f"{path} lacks {', '.join(missing)}; it is not a MedMNIST file (expected keys {', '.join(keys)})")
            return {k: npz[k] for k in keys}
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError) as exc:
        raise UserError(f"{path} is corrupt or truncated ({exc.__class__.__name__}); delete it and download it again") from exc


def to_imageset(images: np.ndarray, labels: np.ndarray, flag: str, path: Path) -> ImageSet:
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise UserError(f"{path} images must be uint8 (N,H,W) or (N,H,W,3), got {images.dtype} {images.shape}")
    labels = np.asarray(labels)
    if flag == "chestmnist":  # multi-label: keep the images with exactly one finding
        keep = labels.sum(axis=1) == 1
        images, labels = images[keep], labels[keep].argmax(axis=1)
    labels = labels.reshape(len(labels), -1)[:, 0].astype(np.int64)
    if len(labels) != len(images):
        raise UserError(f"{path} has {len(images)} images but {len(labels)} labels")
    t = torch.from_numpy(images)
    t = t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return ImageSet(torch.from_numpy(labels), images=t.contiguous())


def make_loader(flag: str, suffix: str):
    def load(cfg, root, seed) -> RawDataset:
        file = f"{flag}{suffix}.npz"
        path = Path(root) / file
        if not path.is_file():
            if not cfg.get("download", True):
                raise UserError(f"MedMNIST file {path} not found; download {ZENODO.format(file=file)} into {root}")
            download(flag, file, path)
        arrays = read_npz(path, flag)
        names = CLASS_NAMES[flag]
        train = to_imageset(arrays["train_images"], arrays["train_labels"], flag, path)
        test = to_imageset(arrays["test_images"], arrays["test_labels"], flag, path)
        top = int(max(train.labels.max(), test.labels.max()))
        if top >= len(names):
            raise UserError(f"{path} has label {top}, but {flag} has {len(names)} classes; the file is not {flag}")
        return RawDataset(f"{flag}{suffix}", list(names), train, test, flip=True)

    return load


SUBSET_FILE = "pathmnist_test_subset.npz"


@dataset("pathmnist_subset", f"data_root/{SUBSET_FILE}: a 718-image subset of PathMNIST's test split (28 px RGB, "
                             "9 classes), split here by a seeded stratified split (test_fraction)",
         shape=DatasetShape(9, 3, 28))
def load_pathmnist_subset(cfg, root, seed) -> RawDataset:
    """The PathMNIST subset this project's machines have beside the code (`test_images`,
    `test_labels` only): no official split exists for it, so a seeded stratified one is made."""
    path = Path(root) / SUBSET_FILE
    if not path.is_file():
        raise UserError(f"{path} not found; set data_root to the folder holding {SUBSET_FILE}")
    arrays = read_npz(path, "pathmnist", keys=("test_images", "test_labels"))
    every = to_imageset(arrays["test_images"], arrays["test_labels"], "pathmnist", path)
    if int(every.labels.max()) >= len(CLASS_NAMES["pathmnist"]):
        raise UserError(f"{path} has label {int(every.labels.max())}, but PathMNIST has 9 classes")
    train_idx, test_idx = stratified_split(every.labels.numpy(), cfg.test_fraction, seed)
    pick = lambda idx: ImageSet(every.labels[idx], images=every.images[idx])
    return RawDataset("pathmnist_subset", list(CLASS_NAMES["pathmnist"]), pick(train_idx), pick(test_idx), flip=True,
                      split=f"seeded stratified split of a subset of the official test split, "
                            f"test_fraction {cfg.test_fraction}, seed {seed}")


RGB_FLAGS = ("pathmnist", "dermamnist", "bloodmnist", "retinamnist")  # the others are grayscale
for _flag in FLAGS:
    for _suffix in SIZES:
        dataset(f"{_flag}{_suffix}", f"data_root/{_flag}{_suffix}.npz (downloaded when missing)",
                shape=DatasetShape(len(CLASS_NAMES[_flag]), 3 if _flag in RGB_FLAGS else 1,
                                   int(_suffix[1:] or 28)))(make_loader(_flag, _suffix))
