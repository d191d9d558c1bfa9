"""Continual-learning methods: one file each, registered by name (with the reference framework's
names as aliases)."""
from __future__ import annotations

import importlib
import pkgutil

from dynammo.registry import Registry

METHODS: Registry = Registry("method")

# `dynammo list` shows the methods in this order; any other module of this package is a method too
# (a new method file registers itself without editing this list).
_ORDER = ("joint", "finetune", "replay", "icarl", "gem", "ucir", "bic", "podnet", "wa", "der_pp", "der",
          "acl", "dynammo", "l2p", "dualprompt", "coda_prompt", "simplecil", "aper", "ranpac")
_NOT_METHODS = {"base", "distill", "first_task", "frozen", "prompt_base"}  # what several methods share
_found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")} - _NOT_METHODS
for _module in [m for m in _ORDER if m in _found] + sorted(_found - set(_ORDER)):
    importlib.import_module(f"dynammo.methods.{_module}")
