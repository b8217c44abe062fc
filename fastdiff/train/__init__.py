"""Training: the shared runtime (:mod:`fastdiff.train.runtime`) that the paper-specific trainers build on."""

from fastdiff.train.runtime import DistContext, TrainConfig, TrainState, distributed_context, init_distributed, train

__all__ = ["DistContext", "TrainConfig", "TrainState", "distributed_context", "init_distributed", "train"]
