"""The engine's own models, built only from engine.nn, and their checkpoints."""

from engine.models.bert import BERT_SIZES, BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from engine.models.checkpoint import load_gguf_llama, load_hf_bert, load_pretrained, save_pretrained
from engine.models.gpt import GPT, GPT_SIZES, GPTConfig

__all__ = [
    "BERT_SIZES", "BertConfig", "BertForMaskedLM", "BertForSequenceClassification", "BertModel", "GPT", "GPTConfig",
    "GPT_SIZES", "load_gguf_llama", "load_hf_bert", "load_pretrained", "save_pretrained",
]
