"""The engine's BERT encoder and its heads."""

import pytest
import torch

from engine.models import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from engine.testing import assert_close, kernel_device, triton_launches

DEVICE = kernel_device()


def _ids(batch=2, seqlen=13, seed=0):
    return torch.randint(0, 128, (batch, seqlen), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_padding_does_not_change_the_real_tokens():
    torch.manual_seed(0)
    model = BertModel(BertConfig.named("tiny", dropout=0.0)).to(DEVICE).eval()
    ids = _ids(1, 9)
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long, device=DEVICE)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 6)], dim=1).to(DEVICE)
    with torch.no_grad(), triton_launches() as launches:
        alone = model(ids)
        with_padding = model(padded, attention_mask=mask)
    assert launches["attention_fwd"] == 2 * 2
    assert_close(with_padding[:, :9], alone)


def test_classification_head_and_loss():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig.named("tiny", num_labels=3)).to(DEVICE)
    labels = torch.tensor([0, 2], device=DEVICE)
    logits, loss = model(_ids(), labels=labels)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_masked_lm_head_is_tied_and_ignores_unmasked_positions():
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.named("tiny")).to(DEVICE)
    assert model.decoder.weight is model.bert.embeddings.word.weight
    ids = _ids()
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    logits, loss = model(ids, labels=labels)
    assert logits.shape == (2, 13, 128)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[:, 3], ids[:, 3]))


def test_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(embed_dim=100, num_heads=12)
    with pytest.raises(ValueError, match="unknown BERT size"):
        BertConfig.named("giant")
