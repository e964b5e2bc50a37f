"""Fine-tuning: the model zoo (models.py, gpt.py, data.py), the settings of a run and of a sweep
(config.py), one training loop for LoRA and full fine-tuning (trainer.py) apart from what a run records
(record.py), and sweeps over rank, alpha, scaling and targets (sweep.py), in this process or on Ray
(ray_executor.py, imported only when asked for: Ray is optional)."""

from .config import SweepSpec, TrainConfig
from .models import BUILTIN_MODELS, Task, known_models, prepare_task
from .record import TrainResult
from .sweep import Executor, LocalExecutor, SweepResult, make_executor, run_sweep, run_sweep_job, sweep_settings
from .trainer import evaluate, train

__all__ = ["BUILTIN_MODELS", "Executor", "LocalExecutor", "SweepResult", "SweepSpec", "Task", "TrainConfig",
           "TrainResult", "evaluate", "known_models", "make_executor", "prepare_task", "run_sweep", "run_sweep_job",
           "sweep_settings", "train"]
