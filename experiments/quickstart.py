"""Quickstart: a ~4M-parameter LLaMA-style model on the Python standard library's source.

Trains in under 10 minutes on 2 CPU cores and prints the validation loss beside the unigram
baseline, then a sample:

    python -m llm_research.main --config experiments/quickstart.py --workdir /tmp/quickstart
"""
from llm_research.config import base_config


def get_config():
  config = base_config()
  config.model.update(num_layers=4, embed_dim=256, num_heads=4, num_kv_heads=2, head_dim=64,
                      mlp_dim=704)
  config.data.update(source="stdlib", tokenizer="sentencepiece", vocab_size=4096, seq_len=256)
  # 8 rows a step: for the same tokens, a lower loss than 16 or 4 rows a step.
  # eval_batches x batch_size: 256 validation rows.
  config.train.update(steps=750, batch_size=8, learning_rate=6e-3, warmup_steps=75,
                      log_every=10, eval_every=250, eval_batches=32, checkpoint_every=250)
  # The prompt ends where a token ends (a line's indentation): "def " would end on a lone space
  # piece, which in this corpus mostly comes before digits. A cooler temperature keeps to code.
  config.sample.update(
      prompt="import os\n\n\nclass Reader:\n\n    def __init__(self, path):\n        ",
      max_new_tokens=96, temperature=0.5, top_k=40, top_p=1.0, seed=0)
  return config
