"""bGPT's quickstart: a ~6M-parameter byte model (PRESETS["small"]) on the CPU-state generator's
tiny build, the README's command (minutes on 2 CPU cores):

    python -m llm_research.main --config experiments/bgpt.py --workdir /tmp/bgpt

A byte model needs no tokenizer: `data.source="bytes"` feeds each example's raw bytes, one per
row of `data.seq_len` bytes (`llm_research/data/pipeline.py`); any other byte dataset is one
override away (`--config.data.byte_dataset=digits_bmp --config.data.seq_len=3152`).
"""
from llm_research.config import base_config
from llm_research.models import bgpt


def get_config():
  config = base_config("bgpt")
  config.model.update(**bgpt.PRESETS["small"])
  config.data.update(source="bytes", byte_dataset="cpu_states", byte_config="tiny", seq_len=336)
  config.train.update(steps=750, batch_size=8, learning_rate=6e-3, warmup_steps=75,
                      log_every=10, eval_every=250, eval_batches=32, checkpoint_every=250)
  config.sample.update(prompt="", max_new_tokens=96, temperature=0.0)
  return config
