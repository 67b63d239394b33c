"""Training engine: typed YAML recipes, one accelerate loop, LM task, LoRA and state tuning.

``train(recipe_path_or_TrainConfig, overrides=[...]) -> Path`` (the exported model folder);
CLI: ``mmrwkv train RECIPE.yaml --set key=value``. Heavy imports (torch, accelerate) happen
inside the functions.
"""
from multimodal_rwkv.training.config import TrainConfig, apply_overrides, load_config, save_config  # noqa: F401
from multimodal_rwkv.training.loop import TrainingError, TrainingInterrupted, train  # noqa: F401
from multimodal_rwkv.training.task import TASKS, StepContext, Task, get_task  # noqa: F401

__all__ = ["train", "TrainConfig", "load_config", "apply_overrides", "save_config", "Task", "TASKS",
           "StepContext", "get_task", "TrainingError", "TrainingInterrupted"]
