"""Continual-learning methods: one file each, registered by name (with the reference framework's
names as aliases)."""
from __future__ import annotations

from dynammo.registry import Registry, register_modules

METHODS: Registry = Registry("method")
# every module of this package is a method (a new method file registers itself), but what several share
register_modules(__name__, __path__, helpers=("base", "distill", "first_task", "frozen", "prompt_base"))
