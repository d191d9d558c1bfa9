"""Continual-learning methods: one file each, registered by name (with the reference framework's
names as aliases)."""
from __future__ import annotations

import importlib

from dynammo.registry import Registry

METHODS: Registry = Registry("method")

for _module in ("joint", "finetune", "replay", "acl", "dynammo"):
    importlib.import_module(f"dynammo.methods.{_module}")
