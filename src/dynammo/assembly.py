"""The one place a run's objects are built: data -> scenario -> engine (device, transforms) ->
method. `dynammo run`, `resume`, `eval`, `cost`, the checkpoint loaders, the benchmarks and the
tests all build through here, so they build the same thing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from dynammo.compute import resolve_device
from dynammo.console import Console
from dynammo.data import load_data
from dynammo.data.scenario import Scenario
from dynammo.data.transforms import BatchTransform, make_transforms
from dynammo.distributed import current_world
from dynammo.engine import Engine, seed_everything
from dynammo.methods import METHODS


@dataclass
class RunParts:
    data: object  # the RawDataset (None when built from a checkpoint's scenario record)
    scenario: Scenario
    engine: Engine
    method: object

    def __iter__(self):  # data, scenario, engine, method = build_run(...)
        return iter((self.data, self.scenario, self.engine, self.method))


def quiet_console() -> Console:
    return Console(progress="false", quiet=True)


def build_run(cfg, console: Optional[Console] = None, device: Optional[str] = None, check: bool = True,
              augment: Optional[bool] = None) -> RunParts:
    """Everything that can fail on bad input, before anything is written. check=False skips the
    method's config check (to build a configuration it refuses on purpose); augment overrides
    cfg.augment for the training transform."""
    seed_everything(cfg.seed)
    dev = resolve_device(device or cfg.device)
    method_cls = METHODS.get(cfg.method)
    data = load_data(cfg, cfg.seed)
    scenario = Scenario.from_config(data, cfg, cfg.seed)
    if check:
        method_cls.check_config(cfg, data.num_classes)
    transforms = make_transforms(data, cfg.augment if augment is None else augment, augment_crop=cfg.augment_crop,
                                 test_crop=cfg.test_crop)
    return RunParts(data, scenario, *_engine_and_method(cfg, console, dev, scenario, transforms))


def build_from_record(cfg, scenario: Scenario, mean, std, device: str = "cpu") -> RunParts:
    """A method without its data (a checkpoint's scenario record: class names, order, task sizes,
    normalisation), for inference, export and cost accounting."""
    tf = BatchTransform(mean, std)
    return RunParts(None, scenario, *_engine_and_method(cfg, None, resolve_device(device), scenario, (tf, tf)))


def _engine_and_method(cfg, console, device, scenario, transforms) -> Tuple[Engine, object]:
    engine = Engine(cfg, console or quiet_console(), device, cfg.seed, world=current_world())
    for tf in transforms:  # the image layout of the compute path (contiguous unless it is channels-last)
        tf.channels_last = engine.compute.channels_last
    engine.set_transforms(*transforms)
    method = METHODS.get(cfg.method)(cfg, engine, scenario)  # builds the backbone: checks names and weights
    engine.compute.prepare_module(method.net)
    engine.network = lambda: method.net  # Joint replaces its network every task: always the current one
    return engine, method
