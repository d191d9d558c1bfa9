"""The `dynammo` command with float64 as torch's default dtype (every network and input in float64).

tests/test_distributed.py compares a 2-process run with a 1-process run through this script: in
float64 the two differ only by the summation order of the gradients (~1e-15), so a difference
beyond that is a bug, not rounding. Usage: python tests/dist_cli.py run ... (or under torchrun)."""
import sys

import torch

torch.set_default_dtype(torch.float64)

from dynammo.cli import main  # noqa: E402  (after the dtype is set: modules are built in float64)

raise SystemExit(main(sys.argv[1:]))
