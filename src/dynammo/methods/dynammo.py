"""DynaMMo: dynamic model merging (Qazi et al., "DynaMMo: Dynamic Model Merging for Efficient Class
Incremental Learning for Medical Images", MIUA 2024).

Everything as ACL (`methods/acl.py`), plus stage 2 (tasks t >= 1, between adapter training and
head training): the task adapter sets are merged into ONE set by a uniform element-wise mean,
kept as an exact running mean m_t = ((t-1) m_{t-1} + w_t) / t, and frozen. Stage 3 and inference
use the merged model: one forward pass whose feature every head reads, so the inference cost does
not grow with the number of tasks. Only the merged set and the last task set (the next task's
initialisation) are stored, not one set per task.

What this implementation does differently from the released code (which trains ACL, re-averages
state dicts inside every forward and still runs one pass per task): the merge happens once per
task and is cached; inference runs one pass; `num_batches_tracked` is never averaged.

Options (faithful defaults first):
- merge_bn: average | reestimate. `average` averages the adapters' BatchNorm running mean/var like
  every other tensor (a heuristic); `reestimate` recomputes the merged adapters' BatchNorm
  statistics from the memory + the current task's data after each merge.
- herding_space: task | merged. Which features select exemplars (the balanced set of stage 3 and
  the memory): the current task adapter's (faithful) or the merged model's, the ones inference uses.
- head_init: random | auxiliary (shared with ACL). The new head of stage 3 starts random
  (faithful) or as a copy of the auxiliary head trained in stage 1.
"""
from __future__ import annotations

from typing import Optional

import torch

from dynammo.config import Option
from dynammo.data.imageset import ImageSet
from dynammo.data.scenario import Task
from dynammo.methods import METHODS
from dynammo.methods.acl import ACL, AdapterNet
from dynammo.models.adapters import AdapterSet, bn_reestimation, running_mean_


class DynaMMoNet(AdapterNet):
    """Frozen backbone + the merged adapter set + the last task's set + per-task heads.

    With one task the merged set is the task set itself; when the next task starts, that set becomes
    the merged one (the mean of one set) and a copy of it is trained.
    """

    def __init__(self, backbone, layer_names=None):
        super().__init__(backbone, layer_names)
        self.register_module("task_set", None)  # the last task's adapters (init of the next)
        self.register_module("merged", None)  # running mean of every task's adapters
        self.register_buffer("n_merged", torch.zeros((), dtype=torch.long))  # sets in the mean

    def new_task_adapters(self) -> AdapterSet:
        previous: Optional[AdapterSet] = self.task_set
        if previous is not None and self.merged is None:
            self.merged = previous.freeze()  # the mean of the single set of task 0
            self.n_merged.fill_(1)
        self.task_set = self.fresh_or_copy(previous)
        return self.task_set

    def task_adapters(self) -> AdapterSet:
        return self.task_set

    def merge(self) -> None:
        """Stage 2: fold the current task set into the running mean (once per task)."""
        self.n_merged += 1
        running_mean_(self.merged, self.task_set, int(self.n_merged))
        self.merged.freeze()

    def inference_adapters(self) -> AdapterSet:
        return self.merged if self.merged is not None else self.task_set

    def head_features(self, x):
        z = self.encode(x, self.inference_adapters())  # ONE forward pass for every head
        return [z] * len(self.heads)


@METHODS.register("dynammo", aliases=("dynamic_model_merging",))
class DynaMMo(ACL):
    summary = "ACL's task adapters merged into one set by a running mean: one forward pass (MIUA 2024)"
    options = {
        **ACL.options,
        "merge_bn": Option("str", "average", "merged adapters' BatchNorm statistics: average (faithful) | "
                                             "reestimate (on memory + current data)", choices=("average", "reestimate"),
                           faithful="average"),
        "herding_space": Option("str", "task", "features for exemplar herding: task (the task adapter's, "
                                               "faithful) | merged (the merged model's)", choices=("task", "merged"),
                                faithful="task"),
    }
    net_class = DynaMMoNet

    def merge_structure(self, task: Task) -> None:
        if task.id > 0:
            self.net.merge()

    def after_adapters(self, task: Task) -> None:
        """Stage 2 (t >= 1): merge, then optionally re-estimate the merged BatchNorm statistics."""
        self.merge_structure(task)
        if task.id > 0 and self.cfg.merge_bn == "reestimate":
            self.reestimate_bn(ImageSet.concat([self.scenario.train_data(task), self.memory.as_imageset()]))

    def reestimate_bn(self, data: ImageSet) -> None:
        merged = self.net.merged
        self.net.eval()
        with bn_reestimation(merged):  # every process runs every batch: the same statistics everywhere
            self.engine.apply(lambda x: self.net.encode(x, merged), data, shard=False)
        self.net.eval()

    def herding_adapters(self) -> AdapterSet:
        if self.cfg.herding_space == "merged":
            return self.net.inference_adapters()
        return self.net.task_adapters()
