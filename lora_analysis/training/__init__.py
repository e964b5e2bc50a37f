"""Fine-tuning: the model zoo (models.py, gpt.py, data.py), one trainer for LoRA and full fine-tuning
(trainer.py) and sweeps over rank, alpha, scaling and targets (sweep.py)."""

from .models import BUILTIN_MODELS, Task, known_models, prepare_task
from .sweep import Executor, LocalExecutor, ProcessExecutor, SweepResult, run_sweep, run_sweep_job, sweep_settings
from .trainer import TrainConfig, TrainResult, evaluate, train

__all__ = ["BUILTIN_MODELS", "Executor", "LocalExecutor", "ProcessExecutor", "SweepResult", "Task", "TrainConfig",
           "TrainResult", "evaluate", "known_models", "prepare_task", "run_sweep", "run_sweep_job", "sweep_settings",
           "train"]
