"""Fine-tuning: the model zoo (models.py, gpt.py, data.py), the settings of a run and of a sweep
(config.py), one training loop for LoRA and full fine-tuning (trainer.py) apart from what a run records
(record.py), and sweeps over rank, alpha, scaling and targets (sweep.py)."""

from .config import SweepSpec, TrainConfig
from .models import BUILTIN_MODELS, Task, known_models, prepare_task
from .record import TrainResult
from .sweep import Executor, LocalExecutor, ProcessExecutor, SweepResult, run_sweep, run_sweep_job, sweep_settings
from .trainer import evaluate, train

__all__ = ["BUILTIN_MODELS", "Executor", "LocalExecutor", "ProcessExecutor", "SweepResult", "SweepSpec", "Task",
           "TrainConfig", "TrainResult", "evaluate", "known_models", "prepare_task", "run_sweep", "run_sweep_job",
           "sweep_settings", "train"]
