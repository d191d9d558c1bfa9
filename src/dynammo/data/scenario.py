"""Class-incremental scenarios: a class order and a split of it into tasks.

Labels are remapped once so that the classes of task 0 are 0..n0-1, task 1 the next ones, and so
on; `class_order[k]` is the dataset's class id of remapped label k.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from dynammo.data.imageset import ImageSet
from dynammo.errors import UserError


@dataclass(frozen=True)
class Task:
    id: int
    start: int  # first remapped label of the task
    end: int  # one past the last

    @property
    def classes(self) -> List[int]:
        return list(range(self.start, self.end))

    @property
    def size(self) -> int:
        return self.end - self.start


def task_sizes(num_classes: int, init_cls: int, increment) -> List[int]:
    """init_cls + increment (int) or an explicit list of all task sizes -> sizes of every task."""
    if isinstance(increment, list):
        sizes = list(increment)
        if sum(sizes) != num_classes:
            raise UserError(
                f"task sizes {sizes} add up to {sum(sizes)} classes, but the dataset has {num_classes}; make them add up"
            )
        return sizes
    if init_cls > num_classes:
        raise UserError(f"init_cls={init_cls} asks for more classes than the dataset has ({num_classes}); lower it")
    rest = num_classes - init_cls
    if rest % increment:
        raise UserError(
            f"increment={increment} does not divide the {rest} classes left after init_cls={init_cls} "
            f"(dataset has {num_classes}); pick an increment that divides {rest} or give a list of task sizes"
        )
    return [init_cls] + [increment] * (rest // increment)


def make_class_order(num_classes: int, class_order: Optional[Sequence[int]], shuffle: bool, seed: int,
                     rule: str = "numpy") -> List[int]:
    """The class order: an explicit one, the natural one, or shuffled by the seed. rule numpy: numpy's
    RandomState(seed).permutation (PyCIL's); coda: CODA-Prompt's trainer.py, the natural order for seed 0
    and Python's random.seed(seed) + random.shuffle otherwise."""
    if class_order is not None:
        if sorted(class_order) != list(range(num_classes)):
            raise UserError(
                f"class_order must list each class id 0..{num_classes - 1} exactly once, got {list(class_order)}"
            )
        return list(class_order)
    if shuffle and rule == "coda":
        order = list(range(num_classes))
        if seed > 0:
            random.Random(seed).shuffle(order)  # the same draws as random.seed(seed); random.shuffle(order)
        return order
    if shuffle:
        return np.random.RandomState(seed).permutation(num_classes).tolist()
    return list(range(num_classes))


class Scenario:
    """The tasks of a run, with the train/test data remapped to the class order."""

    def __init__(self, train: ImageSet, test: ImageSet, class_names: List[str], class_order: List[int],
                 sizes: List[int]):
        self.class_order = class_order
        self.class_names = [class_names[c] for c in class_order]  # by remapped label
        mapping = torch.empty(len(class_order), dtype=torch.long)
        mapping[torch.as_tensor(class_order)] = torch.arange(len(class_order))
        self.train = train.with_labels(mapping[train.labels])
        self.test = test.with_labels(mapping[test.labels])
        bounds = np.cumsum([0] + list(sizes)).tolist()
        self.tasks = [Task(i, bounds[i], bounds[i + 1]) for i in range(len(sizes))]

    @classmethod
    def from_config(cls, data, cfg, seed: int) -> "Scenario":
        n = data.num_classes
        if data.stream_sizes is not None:  # dataset-per-task stream: one task per dataset, order kept
            return cls(data.train, data.test, data.class_names, list(range(n)), data.stream_sizes)
        sizes = task_sizes(n, cfg.init_cls, cfg.increment)
        order = make_class_order(n, cfg.class_order, cfg.shuffle, seed, cfg.get("shuffle_rule", "numpy"))
        return cls(data.train, data.test, data.class_names, order, sizes)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def train_data(self, task: Task) -> ImageSet:
        return self.train.of_classes(task.classes)

    def test_data_seen(self, task: Task) -> ImageSet:
        """Test images of every class seen up to and including `task`."""
        return self.test.of_classes(range(0, task.end))

    def test_data_unseen(self, task: Task) -> ImageSet:
        """Test images of every class not learned yet after `task` (none after the last task)."""
        return self.test.of_classes(range(task.end, self.tasks[-1].end))

    def task_of_label(self, labels: torch.Tensor) -> torch.Tensor:
        ends = torch.tensor([t.end for t in self.tasks])
        return torch.bucketize(labels, ends, right=True)

    def classes_of_tasks(self) -> List[List[int]]:
        """Each task's classes as dataset class ids."""
        return [[self.class_order[k] for k in t.classes] for t in self.tasks]
