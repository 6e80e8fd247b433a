"""Model definitions: the registry (`config.model.name`), the transformer core and its parts."""
from llm_research.models import registry
from llm_research.models.transformer import Transformer, TransformerConfig

__all__ = ["registry", "Transformer", "TransformerConfig"]
