"""Finetune: plain training on each new task's data; the lower bound that forgets."""
from dynammo.methods import METHODS
from dynammo.methods.base import Method


@METHODS.register("finetune", aliases=("finetune_il", "sequential", "naive"))
class Finetune(Method):
    summary = "train on each task's data only (lower bound)"
