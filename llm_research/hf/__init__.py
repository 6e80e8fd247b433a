"""Hugging Face checkpoints: safetensors shards (safetensors_io), config translation
(architectures) and the tensor map (weights); `llm_research.convert` puts them together."""
