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
  config.train.update(steps=300, batch_size=16, learning_rate=3e-3, warmup_steps=30,
                      log_every=10, eval_every=100, eval_batches=16, checkpoint_every=100)
  config.sample.update(prompt="def ", max_new_tokens=96)
  return config
