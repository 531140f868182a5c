"""mtl_tune: tune, compare and understand multi-task-learning balancing methods."""

__version__ = "0.1.0"
