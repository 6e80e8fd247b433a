"""Model definitions: the transformer core and its variants."""
from llm_research.models.transformer import Transformer, TransformerConfig

__all__ = ["Transformer", "TransformerConfig"]
