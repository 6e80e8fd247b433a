"""Model definitions: the registry (`config.model.name`), the transformer core and its parts,
and bGPT (bgpt.py, `model.name="bgpt"`)."""
from llm_research.models import registry
from llm_research.models.transformer import Transformer, TransformerConfig
from llm_research.models import bgpt  # registers "bgpt"

__all__ = ["registry", "Transformer", "TransformerConfig", "bgpt"]
