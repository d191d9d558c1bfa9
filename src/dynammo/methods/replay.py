"""Replay: Finetune on the task's data plus an exemplar memory of earlier classes (experience
replay with a class-balanced budget, as in Rebuffi et al. 2017's memory without distillation)."""
from dynammo.data.imageset import ImageSet
from dynammo.methods import METHODS
from dynammo.methods.base import Method


@METHODS.register("replay", aliases=("replay_il", "er", "rehearsal"))
class Replay(Method):
    summary = "Finetune + exemplar memory of old classes"
    uses_memory = True

    def training_set(self, task) -> ImageSet:
        return ImageSet.concat([self.scenario.train_data(task), self.memory.as_imageset()])
