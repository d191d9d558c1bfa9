"""dynammo: class-incremental learning of image classifiers for medical imaging."""

__version__ = "0.1.0"
