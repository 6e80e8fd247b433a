"""A tiny run for tests: 2 layers, width 32, byte tokenizer, tiny stdlib corpus."""
from llm_research.config import base_config


def get_config():
  config = base_config()
  config.model.update(num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64)
  config.data.update(stdlib_config="tiny", tokenizer="byte", seq_len=32)
  config.train.update(steps=6, batch_size=8, learning_rate=1e-2, warmup_steps=2, log_every=1,
                      eval_every=3, eval_batches=2, checkpoint_every=3, progress_bar=False)
  config.sample.update(max_new_tokens=8)
  return config
