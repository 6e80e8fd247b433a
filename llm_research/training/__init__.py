"""Training: the train state, objective and step, optimizer, config checks, the Trainer, the
loop, and the training methods (`train.method`), registered here: standard, lte, dpo and
layerskip.

    state.py      TrainState (with the run's key), after-step hooks
    optimizer.py  AdamW, schedules, the trainable-parameter mask
    objective.py  the objective, gradient accumulation, train_step, logged metrics
    method.py     the TrainingMethod interface and its registry
    standard.py   `standard`: the model's params, trained directly
    lte.py        `lte`: LoRA-the-Explorer
    dpo.py        `dpo`: Direct Preference Optimization
    layerskip.py  `layerskip`: layer dropout and the early-exit loss
    checks.py     config values, the mesh, a workdir's existing run
    trainer.py    Trainer: model, mesh, method, sharded state, compiled steps, evaluation
    loop.py       train_and_evaluate: the resumable loop; the unigram baseline
"""
from llm_research.training import standard  # registers "standard" (first: the default)
from llm_research.training import lte  # registers "lte"
from llm_research.training import dpo  # registers "dpo"
from llm_research.training import layerskip  # registers "layerskip"
from llm_research.training.checks import (check_config_values, checked_mesh, data_options,
                                          model_config_from, shape_keys)
from llm_research.training.loop import (PREEMPTED_EXIT_STATUS, Preempted, params_from_source,
                                        train_and_evaluate, unigram_baseline)
from llm_research.training.method import METHODS, TrainingMethod, method_class, register
from llm_research.training.objective import (MEAN, batch_losses, model_objective, token_losses,
                                             train_step)
from llm_research.training.optimizer import (learning_rate_schedule, make_optimizer, param_path,
                                             trainable_mask)
from llm_research.training.standard import Standard
from llm_research.training.state import (AfterStepHook, TrainState, apply_hooks,
                                          step_key)
from llm_research.training.trainer import Trainer

__all__ = ["AfterStepHook", "apply_hooks", "batch_losses", "check_config_values", "checked_mesh",
           "data_options", "learning_rate_schedule", "lte", "make_optimizer", "MEAN",
           "method_class", "METHODS", "model_config_from", "model_objective", "param_path",
           "params_from_source",
           "Preempted", "PREEMPTED_EXIT_STATUS", "register", "shape_keys", "Standard", "standard",
           "step_key", "token_losses", "train_and_evaluate", "train_step", "trainable_mask",
           "Trainer", "TrainingMethod", "TrainState", "unigram_baseline"]
