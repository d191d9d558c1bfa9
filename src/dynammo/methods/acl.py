"""ACL: adapter learning in a frozen pretrained feature extractor (Zhang et al., "Adapter Learning
in Pretrained Feature Extractor for Continual Learning of Diseases", MICCAI 2023).

- The backbone is frozen and kept in eval mode (its BatchNorm statistics never change).
- Each task t gets its own adapter set (one adapter at the input of every chosen residual stage,
  see `models/adapters.py`), initialised as a copy of task t-1's, and its own head
  Linear(d, n_t + 1) whose last output is "others" (every class not of task t).
- Stage 1 (every task): train the new adapters + a fresh auxiliary head with cross-entropy on the
  task's data plus the whole memory, old classes labelled "others". After task 0 the auxiliary
  head becomes head 0.
- Stage 3 (tasks t >= 1): on a class-balanced set (m memory exemplars per old class + m herding-
  chosen images per new class, m = memory_size // n_old), every adapter frozen and the model in eval
  mode, train all heads with sum_i CE(head_i(z_i), local label or "others"); head i's term counts
  only when the batch holds a sample of task i. Adam, lr 1e-3, no weight decay by default.
- Inference: the stem once, the body once per task's adapter set (cost grows linearly with the
  number of tasks); head i reads path i's feature; the "min-others" rule picks the task whose head
  gives the smallest "others" probability, then that head's best real class.

Without pretrained weights (`pretrained: false`) the backbone is first trained, with a plain linear
head and cross-entropy, on task 0's data for `backbone_epochs` epochs, then frozen for good (a
documented deviation: the paper starts from ImageNet weights; set `pretrained: PATH` for that).
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.config import Option
from dynammo.data.imageset import ImageSet
from dynammo.data.memory import balanced_set
from dynammo.data.scenario import Task
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods.base import Method
from dynammo.methods.frozen import (BACKBONE_EPOCHS, FrozenBackboneNet, check_backbone_can_train,
                                    train_backbone_then_freeze)
from dynammo.models.adapters import AdapterSet, stage_channels
from dynammo.models.backbones import backbone_kwargs, build_backbone
from dynammo.models.heads import min_others
from dynammo.optim import OptimSettings, stage_options


def others_labels(y: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Local labels of a task's head: y - start for the task's classes, end - start ("others") else."""
    inside = (y >= start) & (y < end)
    return torch.where(inside, y - start, torch.full_like(y, end - start))


def heads_loss(logits: List[torch.Tensor], y: torch.Tensor, bounds: List[tuple],
               batch_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Stage 3's loss: sum over heads of CE(head_i, local label or "others"); head i's term counts
    only when the batch holds a sample of task i (classes bounds[i][0] .. bounds[i][1] - 1).
    batch_labels: the whole batch's labels, when y is one process's slice of it."""
    present = y if batch_labels is None else batch_labels
    total = logits[0].new_zeros(())
    for z, (start, end) in zip(logits, bounds):
        if ((present >= start) & (present < end)).any():
            total = total + F.cross_entropy(z, others_labels(y, start, end))
    return total


def check_adapter_stages(cfg) -> None:
    """Refuse, before anything is written, layer_names that are not stages of the backbone, and an
    img_size that leaves an adapted stage's input map smaller than the adapter's 3x3 convolution."""
    with torch.random.fork_rng(devices=[]):  # a throw-away backbone: leave the seeded RNG as it was
        backbone = build_backbone(cfg.backbone, **backbone_kwargs(cfg))
    channels = stage_channels(backbone, cfg.layer_names)
    if cfg.img_size is not None:  # every adapted stage needs a map of at least 3x3
        sides = {}

        def record(name, x):
            sides[name] = min(x.shape[-2:])
            return x

        with torch.no_grad():
            backbone.eval()(torch.zeros(1, 3, cfg.img_size, cfg.img_size), stage_hook=record)
        small = [n for n in channels if sides[n] < 3]
        if small:
            raise UserError(f"img_size={cfg.img_size} leaves the input of {', '.join(small)} smaller than 3x3, too "
                            "small for an adapter; raise img_size or set layer_names to other stages")


class AdapterNet(FrozenBackboneNet):
    """A backbone (frozen once `freeze_backbone` is called), adapter sets, and one head per task."""

    def __init__(self, backbone, layer_names: Optional[List[str]] = None):
        super().__init__(backbone)
        self.channels = stage_channels(backbone, layer_names)
        self.heads = nn.ModuleList()

    def encode(self, x: torch.Tensor, adapters: AdapterSet) -> torch.Tensor:
        return self.backbone(x, stage_hook=adapters.hook)

    def fresh_or_copy(self, previous: Optional[AdapterSet]) -> AdapterSet:
        """The next task's set: a trainable copy of the previous one (weights, BN stats, alpha)."""
        new = AdapterSet(self.channels) if previous is None else previous.copy()
        for p in new.parameters():
            p.requires_grad_(True)
        return new.to(next(self.backbone.parameters()).device)

    def head_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Each head's logits (n_i + 1 outputs, the last is "others")."""
        return [head(z) for head, z in zip(self.heads, self.head_features(x))]


class ACLNet(AdapterNet):
    """ACL's model: every task keeps its adapter set; head i reads the feature of path i."""

    def __init__(self, backbone, layer_names=None):
        super().__init__(backbone, layer_names)
        self.paths = nn.ModuleList()  # one AdapterSet per task

    def new_task_adapters(self) -> AdapterSet:
        for old in self.paths:
            old.freeze()
        new = self.fresh_or_copy(self.paths[-1] if len(self.paths) else None)
        self.paths.append(new)
        return new

    def task_adapters(self) -> AdapterSet:
        return self.paths[-1]

    def head_features(self, x):
        h = self.backbone.stem(x)  # shared by every path
        return [self.backbone.body(h, path.hook) for path in self.paths]


ACL_OPTIONS = {
    "layer_names": Option("str_list", None, "backbone stages that get an adapter at their input (default: all)",
                          nonempty=True, unique=True),
    "backbone_epochs": BACKBONE_EPOCHS,
    "head_init": Option("str", "random", "new task head in stage 3: random (faithful) | auxiliary (a copy of "
                                         "stage 1's auxiliary head)", choices=("random", "auxiliary"),
                        faithful="random"),
    **stage_options("_finetune", "stage 3 (balanced head training)", defaults=dict(
        lrate=1e-3, opt_type="adam", weight_decay=0.0, scheduler="multi_step", milestones=[])),
}


@METHODS.register("acl", aliases=("adapter_cl", "continual_adapter"))
class ACL(Method):
    summary = "frozen backbone + one adapter set and 'others' head per task, min-others prediction (MICCAI 2023)"
    uses_memory = True
    options = ACL_OPTIONS
    net_class = ACLNet
    paper_backbone = "an ImageNet-pretrained ResNet-18"
    known_score_name = "others"  # 1 - min over heads of p(others), from min_others

    @classmethod
    def headline_record(cls, cfg) -> Dict[str, str]:
        return {"classifier": "min-others", "confidence": "the chosen head's softmax probability of the predicted class"}

    @classmethod
    def backbone_needs(cls, cfg) -> tuple:
        return "adapters at the input of the backbone's residual stages", ""

    @classmethod
    def check_config(cls, cfg, num_classes: int) -> None:
        super().check_config(cfg, num_classes)
        check_backbone_can_train(cfg, num_classes)
        check_adapter_stages(cfg)

    # ---- model ----
    def build_network(self) -> AdapterNet:
        backbone = build_backbone(self.cfg.backbone, self.cfg.pretrained, **backbone_kwargs(self.cfg, self.scenario))
        net = self.net_class(backbone, self.cfg.layer_names)
        if self.cfg.pretrained:  # the paper's protocol: frozen from the start
            net.freeze_backbone()
        return net

    def begin_task(self, task: Task) -> None:
        self.net.to(self.device)

    # ---- training ----
    def train_task(self, task: Task) -> None:
        if not self.net.backbone_frozen:
            train_backbone_then_freeze(self, task)
        adapters = self.net.new_task_adapters()
        aux = self.train_adapters(task, adapters)  # stage 1
        adapters.freeze()
        self.after_adapters(task)  # stage 2 (DynaMMo's merge)
        self.net.heads.append(self.make_head(task, aux))
        if task.id > 0:
            self.train_heads(task)  # stage 3

    def train_adapters(self, task: Task, adapters: AdapterSet) -> nn.Linear:
        """Stage 1: the new adapters + an auxiliary head, on task data + memory (old = "others")."""
        aux = nn.Linear(self.net.backbone.out_dim, task.size + 1).to(self.device)
        data = ImageSet.concat([self.scenario.train_data(task), self.memory.as_imageset()])
        self.net.eval()
        adapters.train()

        def loss(batch: Batch):
            target = others_labels(batch.y, task.start, task.end)
            logits = aux(self.net.encode(batch.x, adapters))
            return F.cross_entropy(logits, target), logits, target

        self.engine.fit(itertools.chain(adapters.parameters(), aux.parameters()), data, loss,
                        OptimSettings.from_config(self.cfg, first_task=task.id == 0), stage="adapters")
        self.net.eval()
        return aux

    def after_adapters(self, task: Task) -> None:
        """Between stage 1 and stage 3; ACL has nothing to do."""

    def merge_structure(self, task: Task) -> None:
        """The structural part of `after_adapters` (no data needed); ACL has none."""

    def make_head(self, task: Task, aux: nn.Linear) -> nn.Linear:
        """Task 0 keeps its auxiliary head; later heads start random (faithful) or from the aux head."""
        if task.id == 0:
            return aux
        head = nn.Linear(aux.in_features, task.size + 1).to(self.device)
        if self.cfg.head_init == "auxiliary":
            head.load_state_dict(aux.state_dict())
        return head

    def train_heads(self, task: Task) -> None:
        """Stage 3: every head on a class-balanced set, adapters frozen, model in eval mode."""
        m = self.memory.quota(task.start)
        data = balanced_set(self.memory, self.scenario.train_data(task), task.classes, m, self.features,
                            self.engine.generator)
        bounds = [(t.start, t.end) for t in self.scenario.tasks[: task.id + 1]]
        heads = self.net.heads
        for p in heads.parameters():
            p.requires_grad_(True)
        self.net.eval()

        def loss(batch: Batch):
            with torch.no_grad():
                feats = self.net.head_features(batch.x)
            logits = [head(z) for head, z in zip(heads, feats)]
            return heads_loss(logits, batch.y, bounds, batch.batch_labels), min_others(logits)["logits"], batch.y

        self.engine.fit(heads.parameters(), data, loss, OptimSettings.from_config(self.cfg, "_finetune"), stage="heads")

    # ---- inference ----
    def herding_adapters(self) -> AdapterSet:
        return self.net.task_adapters()

    def features(self, data: ImageSet) -> torch.Tensor:
        """Herding features: the current task's adapter path (faithful)."""
        adapters = self.herding_adapters()
        return self.engine.apply(lambda x: self.net.encode(x, adapters), data)

    def predict(self, x: torch.Tensor) -> dict:
        return min_others(self.net(x))

    # ---- structure without training (cost accounting, checkpoints) ----
    def grow(self, task: Task) -> None:
        """Add task's adapters, merge (DynaMMo) and head exactly as training would, without training."""
        self.begin_task(task)
        if not self.net.backbone_frozen:
            self.net.freeze_backbone()
        self.net.new_task_adapters().freeze()
        self.merge_structure(task)
        self.net.heads.append(nn.Linear(self.net.backbone.out_dim, task.size + 1).to(self.device))
