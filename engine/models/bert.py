"""A BERT-style encoder built from engine.nn (post-norm blocks), with heads for sequence
classification and masked-language modelling."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.nn import LayerNorm, TransformerBlock
from engine.nn.blocks import add_norm_module, run_blocks
from engine.settings import check_types, require_finite, require_positive


@dataclass
class BertConfig:
    """Sizes of a BERT encoder; ``num_labels`` sizes the classification head."""

    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    hidden_dim: int = 3072
    eps: float = 1e-12
    dropout: float = 0.1
    num_labels: int = 2

    def __post_init__(self):
        check_types(self)
        require_positive(self, "vocab_size", "max_positions", "type_vocab_size", "embed_dim", "num_layers",
                         "num_heads", "hidden_dim", "num_labels")
        require_finite(self, "eps", low=0, open_low=True)
        require_finite(self, "dropout", low=0, high=1)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"BertConfig: embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")

    @classmethod
    def named(cls, name: str, **overrides) -> "BertConfig":
        if name not in BERT_SIZES:
            raise ValueError(f"unknown BERT size {name!r}; known: {sorted(BERT_SIZES)}")
        return cls(**{**BERT_SIZES[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


BERT_SIZES: dict[str, dict] = {
    "tiny": dict(vocab_size=128, max_positions=64, embed_dim=64, num_layers=2, num_heads=4, hidden_dim=128),
    "minilm-l6": dict(embed_dim=384, num_layers=6, num_heads=12, hidden_dim=1536),
    "base": dict(),
}


class BertEmbeddings(torch.nn.Module):
    def __init__(self, config: BertConfig, **factory):
        super().__init__()
        self.word = torch.nn.Embedding(config.vocab_size, config.embed_dim, **factory)
        self.position = torch.nn.Embedding(config.max_positions, config.embed_dim, **factory)
        self.token_type = torch.nn.Embedding(config.type_vocab_size, config.embed_dim, **factory)
        self.norm = LayerNorm(config.embed_dim, eps=config.eps, **factory)
        self.dropout = torch.nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        words = self.word(input_ids) + self.token_type(types)  # (B, S, E), summed in Hugging Face's order
        x, _ = add_norm_module(self.norm, words, self.position(positions).expand_as(words))
        return self.dropout(x)


class BertModel(torch.nn.Module):
    """input_ids (B, S), attention_mask (B, S) with 1 for tokens and 0 for padding, token_type_ids
    (B, S) -> hidden states (B, S, E); ``pooled`` gives tanh(dense(hidden[:, 0]))."""

    activation_checkpointing = False  # recompute each block's activations in backward (training only)

    def __init__(self, config: BertConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = dict(device=device, dtype=dtype)
        self.embeddings = BertEmbeddings(config, **factory)
        self.blocks = torch.nn.ModuleList(
            TransformerBlock(config.embed_dim, config.num_heads, config.hidden_dim, norm="layer", norm_first=False,
                             activation="gelu", eps=config.eps, dropout=config.dropout, **factory)
            for _ in range(config.num_layers)
        )
        self.pooler = torch.nn.Linear(config.embed_dim, config.embed_dim, **factory)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        x, _ = run_blocks(self.blocks, x, checkpoint=self.activation_checkpointing and self.training, attn_mask=keep)
        return x

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler(hidden[:, 0]))


class BertForSequenceClassification(torch.nn.Module):
    """BERT + pooler + dropout + linear classifier: returns logits (B, num_labels), or
    (logits, cross-entropy loss) with ``labels`` (B,)."""

    def __init__(self, config: BertConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, device=device, dtype=dtype)
        self.dropout = torch.nn.Dropout(config.dropout)
        self.classifier = torch.nn.Linear(config.embed_dim, config.num_labels, device=device, dtype=dtype)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(self.bert.pooled(hidden)))
        return logits if labels is None else (logits, F.cross_entropy(logits.float(), labels))


class BertForMaskedLM(torch.nn.Module):
    """BERT + transform (dense, GELU, LayerNorm) + decoder tied to the word embeddings: returns
    logits (B, S, vocab), or (logits, loss) with ``labels`` (B, S), -100 where not masked."""

    def __init__(self, config: BertConfig, *, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.config = config
        self.bert = BertModel(config, **factory)
        self.transform = torch.nn.Linear(config.embed_dim, config.embed_dim, **factory)
        self.transform_norm = LayerNorm(config.embed_dim, eps=config.eps, **factory)
        self.decoder = torch.nn.Linear(config.embed_dim, config.vocab_size, **factory)
        self.decoder.weight = self.bert.embeddings.word.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        logits = self.decoder(self.transform_norm(F.gelu(self.transform(hidden))))
        if labels is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
