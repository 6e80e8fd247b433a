"""Data: the stdlib TFDS corpus (stdlib_corpus), tokenizers, and grain pipelines (pipeline)."""
from llm_research.data.pipeline import (get_tokenizer, load_source, make_eval_iterator,
                                        make_train_iterator)
from llm_research.data.tokenizers import (ByteTokenizer, RawByteTokenizer, SentencePieceTokenizer,
                                          Tokenizer, train_sentencepiece)
