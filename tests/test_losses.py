"""The losses (losses_decd): Sew against a written-out SDM reference, its margins and positives; the MCM loss and
the two functions that decide what it scores (which pairs, which vocabulary rows)."""

import torch
import torch.nn.functional as F

import math

import pytest

from losses_decd import (IGNORE_INDEX, SEW_FORMULATIONS, batch_vocabulary, masked_caption_loss, sample_mcm_rows,
                         sew_loss)


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


def test_every_sew_formulation_with_zero_margin_is_sdm_exactly():
    image, text = _embeddings(seed=3)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7])
    quality = torch.rand(12, generator=torch.Generator().manual_seed(3))
    sdm = sew_loss(image, text, ids, None, margin=0.0, temperature=0.02)
    assert torch.allclose(sdm, _sdm_reference(image, text, ids, 50.0), rtol=1e-5, atol=1e-5)
    for formulation in SEW_FORMULATIONS:
        assert torch.equal(sew_loss(image, text, ids, quality, margin=0.0, temperature=0.02, formulation=formulation),
                           sdm), formulation


def _kl_row(logits, target):
    """sum_j p_j (log p_j - log(target_j + 1e-8)) for one row, in plain floats."""
    top = max(logits)
    log_norm = top + math.log(sum(math.exp(z - top) for z in logits))
    return sum(math.exp(z - log_norm) * ((z - log_norm) - math.log(t + 1e-8)) for z, t in zip(logits, target))


def _sew_written_out(image, text, ids, quality, margin, temperature, formulation):
    """The three readings of docs/method.md ("Sew loss") written with loops over plain floats."""
    image = F.normalize(image, dim=1).tolist()
    text = F.normalize(text, dim=1).tolist()
    ids, quality, n = ids.tolist(), quality.tolist(), len(ids)
    s = [[sum(a * b for a, b in zip(text[i], image[j])) for j in range(n)] for i in range(n)]
    positive = [[float(ids[i] == ids[j]) for j in range(n)] for i in range(n)]
    target = [[positive[i][j] / sum(positive[i]) for j in range(n)] for i in range(n)]
    shift = {"tighten": [-margin * q for q in quality], "relax": [margin * (1 - q) for q in quality],
             "compress": [0.0] * n}[formulation]
    # Caption i's shift goes on its positives: row i of text->image, column i of image->text.
    t2i = sum(_kl_row([(s[i][j] + shift[i] * positive[i][j]) / temperature for j in range(n)], target[i])
              for i in range(n)) / n
    i2t = sum(_kl_row([(s[j][i] + shift[j] * positive[i][j]) / temperature for j in range(n)], target[i])
              for i in range(n)) / n
    loss = t2i + i2t
    if formulation == "compress":
        pull_text = sum(quality[i] * target[i][j] * (1 - s[i][j]) for i in range(n) for j in range(n)) / n
        pull_image = sum(quality[j] * target[i][j] * (1 - s[j][i]) for i in range(n) for j in range(n)) / n
        loss += margin / temperature * (pull_text + pull_image)
    return loss


@pytest.mark.parametrize("formulation", SEW_FORMULATIONS)
def test_sew_formulation_matches_its_written_out_definition(formulation):
    image, text = _embeddings(batch=7, dim=5, seed=4)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    quality = torch.tensor([1.0, 0.25, 0.5, 0.0, 0.75, 1.0, 0.4])
    for margin, temperature in ((0.05, 0.02), (0.2, 0.1)):
        expected = _sew_written_out(image, text, ids, quality, margin, temperature, formulation)
        actual = sew_loss(image, text, ids, quality, margin=margin, temperature=temperature, formulation=formulation)
        assert math.isclose(actual.item(), expected, rel_tol=1e-5, abs_tol=1e-5), (margin, temperature)


def test_sew_formulations_by_hand_on_two_orthogonal_pairs():
    # Caption i and image i are the same unit vector, the two pairs orthogonal: s = identity, q = (1, 0.5).
    pairs = torch.eye(2)
    ids, quality, margin, temperature = torch.tensor([0, 1]), torch.tensor([1.0, 0.5]), 0.1, 0.1

    def row(positive_logit):  # the KL of a row whose positive has this logit and whose negative has 0
        p = 1 / (1 + math.exp(-positive_logit))
        return p * math.log(p / (1 + 1e-8)) + (1 - p) * (math.log(1 - p) - math.log(1e-8))

    # tighten: positives at (1 - 0.1 * q_i) / 0.1 = 9 and 9.5, in both directions; each direction is a row mean.
    tighten = sew_loss(pairs, pairs, ids, quality, margin=margin, temperature=temperature)
    assert math.isclose(tighten.item(), row(9.0) + row(9.5), rel_tol=1e-4)
    # relax: caption 1 (q = 0.5) eased by 0.05: logits 10 and 10.5; caption 0 (q = 1) is held as SDM holds it.
    relax = sew_loss(pairs, pairs, ids, quality, margin=margin, temperature=temperature, formulation="relax")
    assert math.isclose(relax.item(), row(10.0) + row(10.5), rel_tol=1e-4)
    # compress: the pairs already coincide (1 - s = 0), so nothing to pull: SDM's logits 10 and 10.
    compress = sew_loss(pairs, pairs, ids, quality, margin=margin, temperature=temperature, formulation="compress")
    assert math.isclose(compress.item(), 2 * row(10.0), rel_tol=1e-4)
    # Caption 0 turned 60 degrees away from its image (cos 0.5): the pull adds 0.1 / 0.1 * q_0 * (1 - 0.5) per
    # direction, averaged over the two rows: 2 * 0.5 / 2 = 0.5 on top of the SDM of the same similarities.
    text = torch.tensor([[0.5, math.sqrt(3) / 2], [0.0, 1.0]])
    pulled = sew_loss(pairs, text, ids, quality, margin=margin, temperature=temperature, formulation="compress")
    sdm = sew_loss(pairs, text, ids, quality, margin=0.0, temperature=temperature)
    assert math.isclose(pulled.item() - sdm.item(), 0.5, rel_tol=1e-5)


def test_sew_refuses_an_unknown_formulation():
    image, text = _embeddings(batch=4, seed=5)
    with pytest.raises(ValueError, match="formulation must be one of"):
        sew_loss(image, text, torch.arange(4), None, formulation="widen")


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
