"""`train.method=standard`: the model's params trained directly on the model's objective."""
from llm_research.training.method import TrainingMethod, register
from llm_research.training.objective import batch_losses, train_step
from llm_research.training.optimizer import learning_rate_schedule, make_optimizer


@register("standard")
class Standard(TrainingMethod):
  """The state's params are the model's; one AdamW update per batch (`train_step`).

  A method that trains the model's params on another objective (a preference loss, an
  early-exit loss) subclasses this and overrides `objective`."""

  def __init__(self, config, model_config, hooks=()):
    super().__init__(config, model_config, hooks)
    self.optimizer = make_optimizer(config.train)
    self.schedule = learning_rate_schedule(config.train)

  def objective(self, params, batch, rng):
    """(value, sums) of one batch (llm_research/training/objective.py): the model's loss."""
    return batch_losses(params, batch, rng, model=self.model, z_loss=self.config.train.z_loss)

  def init(self, params, rng):
    del rng  # nothing drawn: a fresh optimizer state
    return params, self.optimizer.init(params)

  def step(self, state, batch):
    tc = self.config.train
    return train_step(state, batch, objective=self.objective, optimizer=self.optimizer,
                      schedule=self.schedule, grad_accum=tc.grad_accum, trainable=tc.trainable,
                      hooks=self.hooks)
