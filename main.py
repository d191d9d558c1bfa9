"""Entry point for people coming from the reference framework (CL_Pytorch / PyCIL style):

    python main.py --config options.yaml [--device 0] [--checkpoint_dir DIR]

The YAML may be flat or nested in the reference's sections (basic:, usual:, special:, and
options: <dataset>: <backbone>:); its flat option names (lrate, opt_type, opt_mom, init_cls,
increment, memory_size, sampling_method, ...) are dynammo's own keys, and its other names
(model_name, convnet_type, random_seed, ...) are mapped.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from dynammo.legacy import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
