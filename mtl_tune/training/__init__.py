"""The generic, Ray-independent trainer (:func:`mtl_tune.training.loop.train`)."""

from mtl_tune.training.loop import Trainer, train

__all__ = ["Trainer", "train"]
