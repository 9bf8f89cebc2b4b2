"""Training and fine-tuning: the loop (``loop``), its settings (``config``), checkpoints that resume
exactly and a lock per run folder (``checkpoints``), metrics and the loss curve (``records``), and
multi-process runs (``parallel``)."""

from engine.train.checkpoints import Checkpoints, RunLock
from engine.train.config import PRECISIONS, TrainConfig, config_from_args
from engine.train.loop import BatchStream, NonFiniteError, count_parameters, optimizer_groups, train, warmup_cosine
from engine.train.parallel import distributed, init_distributed
from engine.train.records import MetricsLog, plot_loss

__all__ = [
    "PRECISIONS", "BatchStream", "Checkpoints", "MetricsLog", "NonFiniteError", "RunLock", "TrainConfig",
    "config_from_args", "count_parameters", "distributed", "init_distributed", "optimizer_groups", "plot_loss",
    "train", "warmup_cosine",
]
