"""A GPT-style decoder language model built from engine.nn: GPT-2 (learned positions, LayerNorm,
GELU) and Llama-style options (RoPE, RMSNorm, SwiGLU, grouped-query attention, tied or untied
embeddings), with ``generate()`` over a KV cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from engine.nn import KVCache, PagedKVCache, RotaryEmbedding, TransformerBlock
from engine.nn.blocks import ACTIVATIONS, add_norm_module, make_norm, run_blocks
from engine.ops import linear_cross_entropy
from engine.settings import check_types, require, require_finite, require_positive


@dataclass
class GPTConfig:
    """Sizes and options of a decoder. Derived in ``__post_init__``: ``num_kv_heads`` (default
    ``num_heads``), ``hidden_dim`` (default 4 * embed_dim), ``head_dim``."""

    vocab_size: int = 50257
    max_positions: int = 1024
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int | None = None
    hidden_dim: int | None = None
    norm: str = "layer"  # "layer" | "rms"
    activation: str = "gelu_tanh"  # see engine.nn.MLP; "swiglu" for Llama
    position: str = "learned"  # "learned" | "rope"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = True
    eps: float = 1e-5
    dropout: float = 0.0
    head_dim: int = dataclasses.field(init=False)

    def __post_init__(self):
        check_types(self)
        require_positive(self, "vocab_size", "max_positions", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                         "hidden_dim")
        require(self, "norm", self.norm in ("layer", "rms"), "'layer' or 'rms'", self.norm)
        require(self, "activation", self.activation in (*ACTIVATIONS, "swiglu"), f"one of {[*ACTIVATIONS, 'swiglu']}",
                self.activation)
        require(self, "position", self.position in ("learned", "rope"), "'learned' or 'rope'", self.position)
        require_finite(self, "eps", low=0, open_low=True)
        require_finite(self, "dropout", low=0, high=1)
        require_finite(self, "rope_base", low=1, open_low=True)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"GPTConfig: embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"GPTConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        self.num_kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        self.hidden_dim = 4 * self.embed_dim if self.hidden_dim is None else self.hidden_dim
        self.head_dim = self.embed_dim // self.num_heads

    @classmethod
    def named(cls, name: str, **overrides) -> "GPTConfig":
        """A configuration from ``GPT_SIZES`` with fields overridden."""
        if name not in GPT_SIZES:
            raise ValueError(f"unknown GPT size {name!r}; known: {sorted(GPT_SIZES)}")
        return cls(**{**GPT_SIZES[name], **overrides})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


_LLAMA = dict(norm="rms", activation="swiglu", position="rope", bias=False)
GPT_SIZES: dict[str, dict] = {
    "tiny": dict(vocab_size=256, max_positions=128, embed_dim=64, num_layers=2, num_heads=4),
    "gpt2": dict(),  # 124M
    "llama-tiny": dict(vocab_size=256, max_positions=128, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       hidden_dim=160, eps=1e-6, **_LLAMA),
    "smollm2-135m": dict(vocab_size=49152, max_positions=8192, embed_dim=576, num_layers=30, num_heads=9,
                         num_kv_heads=3, hidden_dim=1536, eps=1e-5, rope_base=100000.0, **_LLAMA),
}


class GPT(torch.nn.Module):
    """Decoder LM: input_ids (B, S) -> logits (B, S, vocab); pre-norm blocks whose residual adds are
    fused into the next norm."""

    activation_checkpointing = False  # recompute each block's activations in backward (training only)

    def __init__(self, config: GPTConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = dict(device=device, dtype=dtype)
        self.tok_embed = torch.nn.Embedding(config.vocab_size, config.embed_dim, **factory)
        if config.position == "learned":
            self.pos_embed = torch.nn.Embedding(config.max_positions, config.embed_dim, **factory)
        else:
            self.rotary = RotaryEmbedding(config.head_dim, config.rope_base, device=device)
        self.drop = torch.nn.Dropout(config.dropout)
        self.blocks = torch.nn.ModuleList(
            TransformerBlock(config.embed_dim, config.num_heads, config.hidden_dim, num_kv_heads=config.num_kv_heads,
                             norm=config.norm, norm_first=True, activation=config.activation, bias=config.bias,
                             eps=config.eps, dropout=config.dropout, **factory)
            for _ in range(config.num_layers)
        )
        self.norm = make_norm(config.norm, config.embed_dim, eps=config.eps, bias=config.bias, **factory)
        self.lm_head = torch.nn.Linear(config.embed_dim, config.vocab_size, bias=False, **factory)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: torch.nn.Module) -> None:
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | PagedKVCache | None = None,
                      lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) token ids -> (B, S, E) after the final norm. With a cache, positions continue
        from what it holds (per sequence for a paged one) and the cache advances by S, or by
        ``lengths`` (B,), each row's real tokens (right-padded prompts, a paged cache)."""
        seqlen = input_ids.shape[1]
        used = seqlen if cache is None else cache.most_positions(seqlen)
        if used > self.config.max_positions:
            raise ValueError(f"GPT: {used} positions exceed max_positions={self.config.max_positions}")
        positions = (torch.arange(seqlen, device=input_ids.device) if cache is None
                     else cache.positions(seqlen).to(input_ids.device))  # (S,), or (B, S) for a paged cache
        x = self.tok_embed(input_ids)
        rotary = None
        if self.config.position == "learned":
            x = x + self.pos_embed(positions)
        else:
            rotary = self.rotary.cos_sin(positions)
        checkpoint = self.activation_checkpointing and self.training and cache is None
        x, residual = run_blocks(self.blocks, self.drop(x), checkpoint=checkpoint, is_causal=True, rotary=rotary,
                                 cache=cache)
        if cache is not None:
            cache.advance(seqlen if lengths is None else lengths)
        return add_norm_module(self.norm, x, residual)[0]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | PagedKVCache | None = None, *,
                return_logits: bool | None = None):
        """Logits (B, S, vocab); with ``labels`` (B, S), (logits or None, loss): the mean next-token
        cross-entropy in fp32 (labels shifted inside; -100 ignored), computed from the hidden
        states by engine.ops.linear_cross_entropy, so no (B, S, vocab) logits are made for it.
        The logits come too when ``return_logits`` (default: when not training)."""
        hidden = self.hidden_states(input_ids, cache)
        if labels is None:
            return self.lm_head(hidden)
        loss = linear_cross_entropy(hidden[:, :-1], self.lm_head.weight, labels[:, 1:], ignore_index=-100,
                                    loss_dtype=torch.float32)
        if return_logits is None:
            return_logits = not self.training
        return (self.lm_head(hidden) if return_logits else None), loss

    def new_cache(self, batch: int, capacity: int, *, paged: bool = False, page_size: int = 16
                  ) -> KVCache | PagedKVCache:
        """A cache for ``batch`` sequences of up to ``capacity`` tokens: contiguous, or ``paged``."""
        weight = self.tok_embed.weight
        kind, options = (PagedKVCache, dict(page_size=page_size)) if paged else (KVCache, {})
        return kind(self.config.num_layers, batch, self.config.num_kv_heads, capacity, self.config.head_dim,
                    device=weight.device, dtype=weight.dtype, **options)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | list[torch.Tensor], max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, do_sample: bool = False,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None
                 ) -> torch.Tensor | list[torch.Tensor]:
        """Continue (B, S) prompts by up to ``max_new_tokens`` tokens: greedy unless ``do_sample``,
        then sampling from softmax(logits / temperature) restricted to the ``top_k`` most likely
        tokens and the smallest set whose probability reaches ``top_p``. Sequences that produced
        ``eos_token_id`` are padded with it. Returns (B, S + new).

        A list of 1-D prompts of different lengths decodes as one batch over a paged cache (each
        sequence at its own position, every step one kernel launch per layer for the whole batch)
        and returns a list: each prompt with its new tokens, the tokens it would get alone."""
        if isinstance(input_ids, (list, tuple)):
            if not input_ids or any(not isinstance(p, torch.Tensor) or p.dim() != 1 or not p.numel()
                                    for p in input_ids):
                raise ValueError("generate: a list of prompts must hold non-empty 1-D tensors of token ids")
        if max_new_tokens <= 0:
            return input_ids
        if do_sample and (temperature <= 0 or (top_k is not None and top_k < 1) or (top_p is not None and top_p <= 0)):
            raise ValueError("generate: sampling needs temperature > 0, top_k >= 1 and top_p > 0")
        was_training = self.training
        self.eval()  # no dropout while decoding
        try:
            return self._generate(input_ids, max_new_tokens, temperature, top_k, top_p, do_sample, eos_token_id,
                                  generator)
        finally:
            self.train(was_training)

    def _generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, do_sample, eos_token_id, generator):
        ragged = isinstance(input_ids, (list, tuple))
        if ragged:  # right-padded into one batch; each sequence's next token follows its own last one
            prompts = input_ids
            lengths = torch.tensor([p.numel() for p in prompts], device=prompts[0].device)
            input_ids = torch.nn.utils.rnn.pad_sequence(list(prompts), batch_first=True)
            cache = self.new_cache(len(prompts), input_ids.shape[1] + max_new_tokens, paged=True)
            hidden = self.hidden_states(input_ids, cache, lengths=lengths)
            logits = self.lm_head(hidden[torch.arange(len(prompts), device=hidden.device), lengths - 1])
        else:
            cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
            logits = self(input_ids, cache=cache)[:, -1]
        tokens, finished = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = _next_token(logits.float(), temperature, top_k, top_p, do_sample, generator)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            tokens.append(token)
            if step + 1 == max_new_tokens or (eos_token_id is not None and finished.all()):
                break
            logits = self(token[:, None], cache=cache)[:, -1]
        new = torch.stack(tokens, dim=1)
        if ragged:
            return [torch.cat([prompt, row]) for prompt, row in zip(prompts, new)]
        return torch.cat([input_ids, new], dim=1)


def _next_token(logits, temperature, top_k, top_p, do_sample, generator) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) token ids."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep up to and including the crossing token
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
