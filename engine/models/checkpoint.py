"""Saving and loading the engine's models, and loading real checkpoints in other layouts.

Nothing here executes code from a file: weights come from safetensors or GGUF, configs from JSON.
- ``save_pretrained(model, folder)`` / ``load_pretrained(folder)``: model.safetensors (shared
  tensors such as tied embeddings stored once) and engine_config.json (class name and config).
- ``load_hf_bert(folder)``: a Hugging Face BERT checkpoint (config.json + model.safetensors).
- ``load_gguf_llama(path)``: a llama.cpp GGUF file of a Llama-architecture model, dequantised.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from engine.models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from engine.models.gpt import GPT, GPT_SIZES, GPTConfig

MODEL_CLASSES = {cls.__name__: (cls, config) for cls, config in (
    (GPT, GPTConfig), (BertModel, BertConfig), (BertForSequenceClassification, BertConfig),
    (BertForMaskedLM, BertConfig),
)}
CONFIG_FILE, WEIGHTS_FILE = "engine_config.json", "model.safetensors"


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype name such as "F32") from a safetensors file, without reading its data."""
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        with safetensors.safe_open(str(path), "pt") as file:
            return {name: (tuple(file.get_slice(name).get_shape()), file.get_slice(name).get_dtype())
                    for name in file.keys()}
    except Exception as error:  # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None


def _layers_in(names, prefix: str) -> int:
    """How many consecutive layers ``prefix{i}.`` the tensor names hold (0 when none)."""
    indices = {int(name[len(prefix):].split(".")[0]) for name in names
               if name.startswith(prefix) and name[len(prefix):].split(".")[0].isdigit()}
    return max(indices) + 1 if indices else 0


def _check_layers(source: str, config_layers: int, names, prefix: str) -> None:
    found = _layers_in(names, prefix)
    if found != config_layers:
        raise ValueError(f"{source}: the config says {config_layers} layers, the weights hold {found} "
                         f"({prefix}0 ... {prefix}{found - 1}); nothing was loaded")


def _check_shapes(source: str, model_meta: torch.nn.Module, shapes: dict[str, tuple[int, ...]],
                  dtypes: dict[str, str], allowed_missing: set[str] = frozenset()) -> None:
    """The weights described by ``shapes`` (and their dtype names) against a model built on the meta
    device (no memory): every mismatch, missing or extra tensor and non-float dtype is named."""
    expected = {name: tuple(t.shape) for name, t in model_meta.state_dict().items()}
    tied: dict[int, set[str]] = {}  # tied weights are stored once, under any one of their names
    for name, parameter in model_meta.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), set()).add(name)
    stored_elsewhere = {name for names in tied.values() if names & set(shapes) for name in names}
    missing = sorted(set(expected) - set(shapes) - set(allowed_missing) - stored_elsewhere)
    extra = sorted(set(shapes) - set(expected))
    wrong = [f"{name} {shapes[name]} (expected {expected[name]})" for name in sorted(set(shapes) & set(expected))
             if shapes[name] != expected[name]]
    not_float = [f"{name} ({dtypes[name]})" for name in sorted(dtypes) if dtypes[name] not in _FLOAT_DTYPES]
    problems = [f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}" for label, items in (
        ("shapes that do not match the config", wrong), ("missing tensors", missing), ("unexpected tensors", extra),
        ("tensors that are not fp16, bf16, fp32 or fp64 (integers, bool, fp8)", not_float)) if items]
    if problems:
        raise ValueError(f"{source} does not match {type(model_meta).__name__}: " + "; ".join(problems))
    lossy = sorted(name for name, dtype in dtypes.items() if dtype == "F64")
    if lossy:
        warnings.warn(f"{source}: {len(lossy)} float64 tensor(s) ({', '.join(lossy[:3])}) are rounded to the model's "
                      "dtype", RuntimeWarning, stacklevel=3)


def _meta_model(source: str, model_cls, config):
    """``model_cls(config)`` on the meta device (shapes without memory), or a ValueError when the
    config implies tensors too large to exist."""
    try:
        return model_cls(config, device="meta")
    except RuntimeError as error:
        raise ValueError(f"{source}: the config implies tensors too large to exist ({error})") from None


def _config_from(source: str, config_cls, fields: dict):
    """``config_cls(**fields)``, with unknown fields and invalid values named."""
    if not isinstance(fields, dict):
        raise ValueError(f"{source}: the config must be a JSON object, got {type(fields).__name__}")
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{source}: unknown {config_cls.__name__} fields {unknown}")
    try:
        return config_cls(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from None


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
    """The model saved by ``save_pretrained`` in ``folder``. The config is validated field by field
    and checked against the weights' header (layer count, every shape, floating-point dtypes)
    before any tensor is built."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    try:
        saved = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"load_pretrained: cannot read {config_path} ({error})") from None
    if not isinstance(saved, dict) or saved.get("class") not in MODEL_CLASSES:
        raise ValueError(f"load_pretrained: {config_path} names an unknown class "
                         f"{saved.get('class') if isinstance(saved, dict) else saved!r}")
    model_cls, config_cls = MODEL_CLASSES[saved["class"]]
    config = _config_from(str(config_path), config_cls, saved.get("config"))
    header = _safetensors_header(folder / WEIGHTS_FILE)
    source = f"load_pretrained: {folder}"
    _check_layers(source, config.num_layers, header, "blocks." if model_cls is GPT else
                  ("blocks." if model_cls is BertModel else "bert.blocks."))
    _check_shapes(source, _meta_model(source, model_cls, config), {n: s for n, (s, _) in header.items()},
                  {n: d for n, (_, d) in header.items()})
    model = model_cls(config, device=device, dtype=dtype)
    safetensors.torch.load_model(model, str(folder / WEIGHTS_FILE), device=str(device or "cpu"))
    return model


# Options of a Hugging Face BERT config that change the model, and the only values BertModel implements.
_HF_BERT_FIXED = {"hidden_act": "gelu", "position_embedding_type": "absolute", "is_decoder": False,
                  "add_cross_attention": False, "chunk_size_feed_forward": 0}


def _hf_bert_config(config: dict, num_labels: int, source: str) -> BertConfig:
    unsupported = [f"{key}={config[key]!r} (supported: {value!r})" for key, value in _HF_BERT_FIXED.items()
                   if key in config and config[key] != value]
    if unsupported:
        raise ValueError(f"{source}: options BertModel does not implement: {', '.join(unsupported)}")
    try:
        fields = dict(vocab_size=config["vocab_size"], max_positions=config["max_position_embeddings"],
                      type_vocab_size=config.get("type_vocab_size", 2), embed_dim=config["hidden_size"],
                      num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                      hidden_dim=config["intermediate_size"], eps=config.get("layer_norm_eps", 1e-12),
                      dropout=config.get("hidden_dropout_prob", 0.1), num_labels=num_labels)
    except KeyError as missing:
        raise ValueError(f"{source}: config.json lacks {missing}") from None
    return _config_from(source, BertConfig, fields)


class _ReadRecorder(dict):
    """A dict that remembers which keys were read (the tensors a mapping actually uses)."""

    def __init__(self, items: dict):
        super().__init__(items)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


class _Prefixed:
    """``tensors`` read with ``prefix`` in front of every name."""

    def __init__(self, tensors: dict, prefix: str):
        self.tensors, self.prefix = tensors, prefix

    def __getitem__(self, name: str):
        return self.tensors[self.prefix + name]

    def __contains__(self, name: str) -> bool:
        return self.prefix + name in self.tensors


def hf_bert_state(hf: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face BertModel tensor names (with or without a "bert." prefix) -> BertModel's."""
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in hf else ""
    hf = _Prefixed(hf, prefix)
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
    if head not in (None, "classification"):
        raise ValueError(f"load_hf_bert: head must be None or 'classification', got {head!r}")
    source = f"load_hf_bert: {folder}"
    try:
        raw_config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{source}: cannot read config.json ({error})") from None
    config = _hf_bert_config(raw_config, num_labels, source)
    header = _safetensors_header(folder / "model.safetensors")
    names = [name.removeprefix("bert.") for name in header]
    _check_layers(source, config.num_layers, names, "encoder.layer.")
    meta = _ReadRecorder({name: torch.empty(shape, device="meta") for name, (shape, _) in header.items()})
    try:
        mapped = hf_bert_state(meta, config.num_layers)
    except KeyError as missing:
        raise ValueError(f"{source} lacks the BERT tensor {missing}") from None
    except RuntimeError as error:  # query, key and value that cannot be concatenated
        raise ValueError(f"{source}: the attention tensors do not fit together ({error})") from None
    _check_shapes(source, _meta_model(source, BertModel, config), {n: tuple(t.shape) for n, t in mapped.items()},
                  {n: header[n][1] for n in meta.read}, allowed_missing={"pooler.weight", "pooler.bias"})
    hf = safetensors.torch.load_file(str(folder / "model.safetensors"))
    state = hf_bert_state(hf, config.num_layers)
    model = (BertModel if head is None else BertForSequenceClassification)(config, device=device, dtype=dtype)
    _load_exactly(model if head is None else model.bert, state, str(folder), allowed_missing={"pooler.weight", "pooler.bias"})
    return model


def _unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of Q/K rows (interleaved rotary pairs) back to the rotate-half layout."""
    out, features = weight.shape
    return weight.reshape(heads, out // heads // 2, 2, features).transpose(1, 2).reshape(out, features)


_GGUF_FLOAT_TYPES = ("F16", "BF16", "F32", "F64")
# the architecture options of the "llama-tiny" size: RMSNorm, SwiGLU, RoPE, no biases
GPT_SIZES_LLAMA = {key: GPT_SIZES["llama-tiny"][key] for key in ("norm", "activation", "position", "bias")}


def _gguf_reader(path: Path):
    """A GGUFReader whose tensors are checked: each one's bytes lie inside the file, overlap no
    other tensor's, and hold a floating-point or quantised float type."""
    import gguf  # optional dependency: pip install gguf

    if not path.is_file():
        raise FileNotFoundError(f"load_gguf_llama: no file at {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # noqa: BLE001  (numpy and gguf raise many kinds on a damaged file)
        raise ValueError(f"load_gguf_llama: {path} is truncated or not a GGUF file ({type(error).__name__}: "
                         f"{error})") from None
    size = path.stat().st_size
    spans = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in reader.tensors)
    for (start, end, name), following in zip(spans, [*spans[1:], (size, size, "the end of the file")]):
        if end > following[0]:
            raise ValueError(f"load_gguf_llama: {path}: tensor {name}'s data (bytes {start}..{end}) runs into "
                             f"{following[2]} at byte {following[0]}: its header claims more than the file holds")
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in ("I8", "I16", "I32", "I64"):  # (the IQ* types are quantised floats)
            raise ValueError(f"load_gguf_llama: {path}: tensor {t.name} holds integers ({kind}), not weights")
    return reader


def _llama_state(tensors: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """llama.cpp tensor names (and row orders) -> GPT's state dict."""
    state = {"tok_embed.weight": tensors["token_embd.weight"], "norm.weight": tensors["output_norm.weight"]}
    if not config.tie_embeddings:
        state["lm_head.weight"] = tensors["output.weight"]
    for i in range(config.num_layers):
        blk, dst = f"blk.{i}.", f"blocks.{i}."
        state[dst + "attn.qkv_proj.weight"] = torch.cat([
            _unpermute_rotary(tensors[blk + "attn_q.weight"], config.num_heads),
            _unpermute_rotary(tensors[blk + "attn_k.weight"], config.num_kv_heads),
            tensors[blk + "attn_v.weight"],
        ])
        state[dst + "attn.out_proj.weight"] = tensors[blk + "attn_output.weight"]
        state[dst + "mlp.fc.weight"] = torch.cat([tensors[blk + "ffn_gate.weight"], tensors[blk + "ffn_up.weight"]])
        state[dst + "mlp.proj.weight"] = tensors[blk + "ffn_down.weight"]
        state[dst + "norm1.weight"] = tensors[blk + "attn_norm.weight"]
        state[dst + "norm2.weight"] = tensors[blk + "ffn_norm.weight"]
    return state


def load_gguf_llama(path: str | Path, *, device=None, dtype=torch.float32) -> GPT:
    """A Llama-architecture GGUF file (any quantisation gguf can read) as a ``GPT``, dequantised to
    ``dtype``. The file's layout, metadata and every tensor's shape are checked against the config
    they imply before anything is dequantised or built."""
    import gguf

    path = Path(path)
    reader = _gguf_reader(path)
    source = f"load_gguf_llama: {path}"

    def field(name, default=None):
        if name not in reader.fields:
            if default is None:
                raise ValueError(f"{source} lacks the metadata field {name}")
            return default
        return reader.fields[name].contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{source} holds a {arch!r} model, not 'llama'")
    infos = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in infos:
        raise ValueError(f"{source} lacks the tensor token_embd.weight")
    shapes = {name: tuple(reversed(t.shape.tolist())) for name, t in infos.items()}
    if len(shapes["token_embd.weight"]) != 2:
        raise ValueError(f"{source}: token_embd.weight has shape {shapes['token_embd.weight']}, not (vocab, width)")
    config = _config_from(source, GPTConfig, {**GPT_SIZES_LLAMA, **dict(
        vocab_size=shapes["token_embd.weight"][0], max_positions=field("llama.context_length"),
        embed_dim=field("llama.embedding_length"), num_layers=field("llama.block_count"),
        num_heads=field("llama.attention.head_count"),
        num_kv_heads=field("llama.attention.head_count_kv", field("llama.attention.head_count")),
        hidden_dim=field("llama.feed_forward_length"), eps=field("llama.attention.layer_norm_rms_epsilon"),
        rope_base=field("llama.rope.freq_base", 10000.0), tie_embeddings="output.weight" not in infos)})
    _check_layers(source, config.num_layers, infos, "blk.")
    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    try:
        mapped = _llama_state(meta, config)
    except KeyError as missing:
        raise ValueError(f"{source} lacks the tensor {missing}") from None
    except RuntimeError as error:  # a row count that does not split into the heads
        raise ValueError(f"{source}: the tensors do not fit the config's heads ({error})") from None
    dtypes = {name: ("F32" if infos[name].tensor_type.name not in _GGUF_FLOAT_TYPES else  # quantised floats
                     infos[name].tensor_type.name) for name in infos}
    _check_shapes(source, _meta_model(source, GPT, config), {n: tuple(t.shape) for n, t in mapped.items()}, dtypes,
                  allowed_missing={"lm_head.weight"})
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.array(values.reshape(shapes[t.name]), np.float32))
    model = GPT(config, device=device, dtype=dtype)
    _load_exactly(model, {k: v.to(dtype) for k, v in _llama_state(tensors, config).items()}, str(path),
                  allowed_missing={"lm_head.weight"})
    return model


def _load_exactly(model: torch.nn.Module, state: dict, source: str, allowed_missing: set[str]) -> None:
    """load_state_dict that names what did not match; ``allowed_missing`` covers tied or new weights."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(f"{source} does not match {type(model).__name__} (missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)})")
