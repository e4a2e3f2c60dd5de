"""The losses (losses_decd): Sew against a written-out SDM reference, its margins and positives; the MCM loss and
the two functions that decide what it scores (which pairs, which vocabulary rows)."""

import torch
import torch.nn.functional as F

from losses_decd import IGNORE_INDEX, batch_vocabulary, masked_caption_loss, sample_mcm_rows, sew_loss


# ---- Sew loss -------------------------------------------------------------------------------------
def _sdm_reference(image, text, ids, scale):
    """IRRA's SDM, written out independently: KL(softmax(scale*cos) || identity-normalised labels), both ways."""
    image = image / image.norm(dim=1, keepdim=True)
    text = text / text.norm(dim=1, keepdim=True)
    labels = (ids.reshape(-1, 1) - ids.reshape(1, -1) == 0).float()
    labels = labels / labels.sum(dim=1, keepdim=True)
    t2i = scale * text @ image.t()
    i2t = t2i.t()
    i2t_loss = F.softmax(i2t, dim=1) * (F.log_softmax(i2t, dim=1) - torch.log(labels + 1e-8))
    t2i_loss = F.softmax(t2i, dim=1) * (F.log_softmax(t2i, dim=1) - torch.log(labels + 1e-8))
    return i2t_loss.sum(dim=1).mean() + t2i_loss.sum(dim=1).mean()


def _embeddings(batch=12, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)


def test_sew_with_zero_margin_is_sdm():
    image, text = _embeddings()
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7])
    quality = torch.rand(12)
    for temperature in (0.02, 0.1):
        expected = _sdm_reference(image, text, ids, 1 / temperature)
        actual = sew_loss(image, text, ids, quality, margin=0.0, temperature=temperature)
        assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_sew_grows_with_margin():
    image, text = _embeddings(seed=1)
    ids = torch.arange(12) // 2
    losses = [sew_loss(image, text, ids, torch.ones(12), margin=m, temperature=0.05).item()
              for m in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(losses, losses[1:])), losses


def test_sew_treats_every_same_identity_pair_as_positive():
    image, text = _embeddings(batch=6, seed=2)
    ids = torch.tensor([0, 0, 0, 1, 2, 3])
    similarity = F.normalize(text, dim=1) @ F.normalize(image, dim=1).t()
    similarity.requires_grad_(True)
    # Re-express the loss as a function of the similarity matrix through embeddings that realise it.
    image_n, text_n = F.normalize(image, dim=1).requires_grad_(True), F.normalize(text, dim=1)
    loss = sew_loss(image_n, text_n, ids, None, margin=0.1, temperature=0.05)
    loss.backward()
    # Moving image 1 towards caption 0 (same identity, different pair) must lower the loss;
    # moving image 3 (identity 1) towards caption 0 must raise it.
    direction_same = (text_n[0] * image_n.grad[1]).sum()
    direction_other = (text_n[0] * image_n.grad[3]).sum()
    assert direction_same < 0 < direction_other
    # The target distribution: three captions of identity 0 share probability mass 1/3 each.
    perfect = torch.eye(6)[[0, 0, 0, 3, 4, 5]].float()
    near_zero = sew_loss(perfect, perfect, ids, None, margin=0.0, temperature=0.001)
    assert near_zero < 1e-4


def test_sample_mcm_rows_draws_a_fraction_of_distinct_rows_or_none():
    assert sample_mcm_rows(64, 1.0) is None  # every pair: nothing drawn, no random number used
    for batch, fraction, expected in ((64, 0.25, 16), (10, 0.25, 2), (3, 0.1, 1), (64, 0.5, 32)):
        torch.manual_seed(0)
        rows = sample_mcm_rows(batch, fraction)
        assert rows.shape == (expected,) and len(set(rows.tolist())) == expected
        assert 0 <= int(rows.min()) and int(rows.max()) < batch
        torch.manual_seed(0)
        assert torch.equal(rows, torch.randperm(batch)[:expected])  # the global generator's next permutation


def test_batch_vocabulary_lists_the_batch_words_and_maps_the_targets_into_them():
    words = torch.tensor([[5, 9, 9, 200], [7, 5, 300, 1]])
    targets = torch.tensor([9, 300, 5, 9])
    candidates, mapped = batch_vocabulary(words[words != 1], targets)
    assert candidates.tolist() == [5, 7, 9, 200, 300]  # sorted, distinct; the padding id 1 was left out
    assert torch.equal(candidates[mapped], targets)


def test_masked_caption_loss_ignores_unmasked_positions():
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 1], [IGNORE_INDEX] * 3 + [5]])
    selected = labels != IGNORE_INDEX
    expected = F.cross_entropy(logits[selected], labels[selected])
    assert torch.allclose(masked_caption_loss(logits, labels), expected)
