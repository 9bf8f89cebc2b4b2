"""Saving and loading the engine's models, and loading real checkpoints in other layouts.

Nothing here executes code from a file: weights come from safetensors or GGUF, configs from JSON.
- ``save_pretrained(model, folder)`` / ``load_pretrained(folder)``: model.safetensors (shared
  tensors such as tied embeddings stored once) and engine_config.json (class name and config).
- ``load_hf_bert(folder)``: a Hugging Face BERT checkpoint (config.json + model.safetensors).
- ``load_gguf_llama(path)``: a llama.cpp GGUF file of a Llama-architecture model, dequantised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from engine.models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from engine.models.gpt import GPT, GPTConfig

MODEL_CLASSES = {cls.__name__: (cls, config) for cls, config in (
    (GPT, GPTConfig), (BertModel, BertConfig), (BertForSequenceClassification, BertConfig),
    (BertForMaskedLM, BertConfig),
)}
CONFIG_FILE, WEIGHTS_FILE = "engine_config.json", "model.safetensors"


def save_pretrained(model: torch.nn.Module, folder: str | Path) -> Path:
    """Write ``model``'s weights and config into ``folder`` (created if needed)."""
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise TypeError(f"save_pretrained: {name} is not one of {sorted(MODEL_CLASSES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(model, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({"class": name, "config": model.config.to_dict()}, indent=2))
    return folder


def load_pretrained(folder: str | Path, *, device=None, dtype=None) -> torch.nn.Module:
    """The model saved by ``save_pretrained`` in ``folder``."""
    folder = Path(folder)
    saved = json.loads((folder / CONFIG_FILE).read_text())
    if saved.get("class") not in MODEL_CLASSES:
        raise ValueError(f"load_pretrained: {folder / CONFIG_FILE} names an unknown class {saved.get('class')!r}")
    model_cls, config_cls = MODEL_CLASSES[saved["class"]]
    model = model_cls(config_cls(**saved["config"]), device=device, dtype=dtype)
    safetensors.torch.load_model(model, str(folder / WEIGHTS_FILE), device=str(device or "cpu"))
    return model


def _hf_bert_config(config: dict, num_labels: int) -> BertConfig:
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"load_hf_bert: hidden_act {config['hidden_act']!r} is not supported (only 'gelu')")
    return BertConfig(vocab_size=config["vocab_size"], max_positions=config["max_position_embeddings"],
                      type_vocab_size=config.get("type_vocab_size", 2), embed_dim=config["hidden_size"],
                      num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                      hidden_dim=config["intermediate_size"], eps=config.get("layer_norm_eps", 1e-12),
                      dropout=config.get("hidden_dropout_prob", 0.1), num_labels=num_labels)


def hf_bert_state(hf: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face BertModel tensor names (with or without a "bert." prefix) -> BertModel's."""
    hf = {k.removeprefix("bert."): v for k, v in hf.items()}
    state = {
        "embeddings.word.weight": hf["embeddings.word_embeddings.weight"],
        "embeddings.position.weight": hf["embeddings.position_embeddings.weight"],
        "embeddings.token_type.weight": hf["embeddings.token_type_embeddings.weight"],
        "embeddings.norm.weight": hf["embeddings.LayerNorm.weight"],
        "embeddings.norm.bias": hf["embeddings.LayerNorm.bias"],
    }
    for i in range(num_layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            state[dst + f"attn.qkv_proj.{kind}"] = torch.cat(
                [hf[src + f"attention.self.{name}.{kind}"] for name in ("query", "key", "value")])
            for theirs, ours in (("attention.output.dense", "attn.out_proj"), ("attention.output.LayerNorm", "norm1"),
                                 ("intermediate.dense", "mlp.fc"), ("output.dense", "mlp.proj"),
                                 ("output.LayerNorm", "norm2")):
                state[dst + f"{ours}.{kind}"] = hf[src + f"{theirs}.{kind}"]
    if "pooler.dense.weight" in hf:
        state["pooler.weight"], state["pooler.bias"] = hf["pooler.dense.weight"], hf["pooler.dense.bias"]
    return state


def load_hf_bert(folder: str | Path, *, head: str | None = None, num_labels: int = 2, device=None,
                 dtype=None) -> torch.nn.Module:
    """A Hugging Face BERT folder (config.json, model.safetensors) as ``BertModel``, or with
    ``head="classification"`` as ``BertForSequenceClassification`` (a new classifier, and a new
    pooler if the checkpoint has none)."""
    folder = Path(folder)
    config = _hf_bert_config(json.loads((folder / "config.json").read_text()), num_labels)
    hf = safetensors.torch.load_file(str(folder / "model.safetensors"))
    try:
        state = hf_bert_state(hf, config.num_layers)
    except KeyError as missing:
        raise ValueError(f"load_hf_bert: {folder} lacks the BERT tensor {missing}") from None
    if head not in (None, "classification"):
        raise ValueError(f"load_hf_bert: head must be None or 'classification', got {head!r}")
    model = (BertModel if head is None else BertForSequenceClassification)(config, device=device, dtype=dtype)
    _load_exactly(model if head is None else model.bert, state, str(folder), allowed_missing={"pooler.weight", "pooler.bias"})
    return model


def _unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of Q/K rows (interleaved rotary pairs) back to the rotate-half layout."""
    out, features = weight.shape
    return weight.reshape(heads, out // heads // 2, 2, features).transpose(1, 2).reshape(out, features)


def load_gguf_llama(path: str | Path, *, device=None, dtype=torch.float32) -> GPT:
    """A Llama-architecture GGUF file (any quantisation gguf can read) as a ``GPT``, dequantised to ``dtype``."""
    import gguf  # optional dependency: pip install gguf

    reader = gguf.GGUFReader(str(path))

    def field(name, default=None):
        if name not in reader.fields:
            if default is None:
                raise ValueError(f"load_gguf_llama: {path} lacks the metadata field {name}")
            return default
        return reader.fields[name].contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"load_gguf_llama: {path} holds a {arch!r} model, not 'llama'")
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.array(values.reshape(tuple(reversed(t.shape.tolist()))), np.float32))
    heads = field("llama.attention.head_count")
    kv_heads = field("llama.attention.head_count_kv", heads)  # optional in GGUF: no grouping
    config = GPTConfig.named(
        "llama-tiny", vocab_size=tensors["token_embd.weight"].shape[0], max_positions=field("llama.context_length"),
        embed_dim=field("llama.embedding_length"), num_layers=field("llama.block_count"), num_heads=heads,
        num_kv_heads=kv_heads, hidden_dim=field("llama.feed_forward_length"),
        eps=field("llama.attention.layer_norm_rms_epsilon"), rope_base=field("llama.rope.freq_base", 10000.0),
        tie_embeddings="output.weight" not in tensors,
    )
    state = {"tok_embed.weight": tensors["token_embd.weight"], "norm.weight": tensors["output_norm.weight"]}
    if not config.tie_embeddings:
        state["lm_head.weight"] = tensors["output.weight"]
    for i in range(config.num_layers):
        blk, dst = f"blk.{i}.", f"blocks.{i}."
        state[dst + "attn.qkv_proj.weight"] = torch.cat([
            _unpermute_rotary(tensors[blk + "attn_q.weight"], heads),
            _unpermute_rotary(tensors[blk + "attn_k.weight"], kv_heads),
            tensors[blk + "attn_v.weight"],
        ])
        state[dst + "attn.out_proj.weight"] = tensors[blk + "attn_output.weight"]
        state[dst + "mlp.fc.weight"] = torch.cat([tensors[blk + "ffn_gate.weight"], tensors[blk + "ffn_up.weight"]])
        state[dst + "mlp.proj.weight"] = tensors[blk + "ffn_down.weight"]
        state[dst + "norm1.weight"] = tensors[blk + "attn_norm.weight"]
        state[dst + "norm2.weight"] = tensors[blk + "ffn_norm.weight"]
    model = GPT(config, device=device, dtype=dtype)
    _load_exactly(model, {k: v.to(dtype) for k, v in state.items()}, str(path), allowed_missing={"lm_head.weight"})
    return model


def _load_exactly(model: torch.nn.Module, state: dict, source: str, allowed_missing: set[str]) -> None:
    """load_state_dict that names what did not match; ``allowed_missing`` covers tied or new weights."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(f"{source} does not match {type(model).__name__} (missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)})")
