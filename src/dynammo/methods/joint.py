"""Joint: after each task, a fresh model trained on all the data of every class seen so far, all
classes at once. No continual constraint: the upper bound the other methods are measured against.
Every fresh model gets the same budget: the first task's settings (init_* keys where set), since
each is trained from scratch as the first task's model is."""
from dynammo.methods import METHODS
from dynammo.methods.base import Method
from dynammo.optim import OptimSettings


@METHODS.register("joint", aliases=("joint_il", "upper_bound", "offline"))
class Joint(Method):
    summary = "all seen data at once, fresh model per task (upper bound)"

    def begin_task(self, task) -> None:
        self.net = self.build_network()  # fresh: trained on every seen class at once
        self.net.head.expand(task.end)
        self.net.to(self.device)

    def training_set(self, task):
        return self.scenario.train.of_classes(range(task.end))

    def train_task(self, task) -> None:
        self.train_mode()
        settings = OptimSettings.from_config(self.cfg, first_task=True)
        self.engine.fit(self.net.parameters(), self.training_set(task), self.step, settings)
