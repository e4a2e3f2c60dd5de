"""DecdModel: losses and gradients, building from CLIP, detaching, error messages."""

import math

import pytest
import torch
import torch.nn.functional as F

from configuration_decd import DecdConfig
from losses_decd import sew_loss
from modeling_decd import DecdModel, resize_position_embedding

from .helpers import hub_cache, random_batch, tiny_clip as _tiny_clip, tiny_config, use_offline_hub_cache
from .test_losses import _embeddings


def test_forward_backward_all_losses_reach_every_module():
    torch.manual_seed(0)
    model = DecdModel(tiny_config(num_identities=4, id_weight=0.5))
    batch = random_batch(model.config, with_mcm=True)
    output = model(**batch)
    for name in ("loss", "loss_sew", "loss_mcm", "loss_id"):
        assert torch.isfinite(getattr(output, name)), name
    expected_total = output.loss_sew + output.loss_mcm + 0.5 * output.loss_id
    assert torch.allclose(output.loss, expected_total)
    output.loss.backward()
    for name in (
        "text_model.embeddings.token_embedding.weight",
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.encoder.layers.0.mlp.fc1.weight",
        "text_projection.weight",
        "visual_projection.weight",
        "decoder.layers.0.cross_attn.in_proj_weight",
        "decoder.text_input.weight",
        "mcm_head.decoder.weight",
        "identity_classifier.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert "logit_scale" not in dict(model.named_parameters())  # fixed by default: a buffer, never trained


def test_decoder_untouched_without_mcm_inputs():
    torch.manual_seed(0)
    model = DecdModel(tiny_config())
    batch = random_batch(model.config, with_mcm=False)
    output = model(**batch)
    assert output.loss_mcm is None and output.loss_id is None
    assert torch.allclose(output.loss, output.loss_sew)
    output.loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith(("decoder.", "mcm_head.")):
            assert parameter.grad is None, name
    assert model.get_parameter("text_projection.weight").grad is not None


def test_mcm_vocabulary_batch_scores_only_the_batch_words():
    """`mcm_vocabulary="batch"`: cross-entropy over the words of the batch's captions (worked out here with
    Python sets from the full-vocabulary logits), gradient only on those rows; "full" scores every row."""
    torch.manual_seed(0)
    model = DecdModel(tiny_config())
    batch = random_batch(model.config)
    captured = {}
    model.mcm_head.register_forward_hook(lambda module, args, output: captured.update(hidden=args[0]))
    losses, gradients = {}, {}
    for mode in ("full", "batch"):
        model.zero_grad()
        model.config.mcm_vocabulary = mode
        output = model(**batch)
        output.loss_mcm.backward()
        losses[mode], gradients[mode] = output.loss_mcm.detach(), model.mcm_head.decoder.weight.grad.clone()
    attended = batch["input_ids"][batch["attention_mask"].bool()]
    words = sorted(set(attended.tolist()))
    labels = batch["mcm_labels"][batch["mcm_labels"] != -100]
    assert set(labels.tolist()) <= set(words) and len(words) < model.config.text_config.vocab_size // 100
    with torch.no_grad():
        full_logits = model.mcm_head(captured["hidden"])  # the last pass ("batch") had the same hidden states
    assert torch.allclose(losses["full"], F.cross_entropy(full_logits, labels), atol=1e-5)
    expected = F.cross_entropy(full_logits[:, words], torch.tensor([words.index(t) for t in labels.tolist()]))
    assert torch.allclose(losses["batch"], expected, atol=1e-5)
    assert losses["batch"] < losses["full"]  # fewer rows to beat
    touched = gradients["batch"].abs().sum(dim=1) > 0
    assert touched.nonzero().flatten().tolist() == words
    assert (gradients["full"].abs().sum(dim=1) > 0).all()


def test_mcm_fraction_trains_mcm_on_a_random_subset_of_the_pairs():
    """`mcm_fraction=0.5`: in training, the MCM loss is the whole-batch MCM loss of the pairs that
    `torch.randperm` draws (same seed), and only those pairs reach the decoder; in eval mode all of them do."""
    torch.manual_seed(0)
    model = DecdModel(tiny_config(mcm_fraction=0.5))
    batch = random_batch(model.config, batch_size=8)
    rows_seen = []
    model.decoder.register_forward_hook(lambda module, args, output: rows_seen.append(args[0].shape[0]))
    model.train()
    torch.manual_seed(1)
    sampled = model(**batch).loss_mcm
    torch.manual_seed(1)
    rows = torch.randperm(8)[:4]
    model.config.mcm_fraction = 1.0
    reference = model(**{name: value[rows] for name, value in batch.items()}).loss_mcm
    assert torch.allclose(sampled, reference, atol=1e-6)
    whole = model(**batch).loss_mcm
    assert not torch.allclose(sampled, whole, atol=1e-4)  # the subset was not the whole batch
    model.config.mcm_fraction = 0.5
    model.eval()
    assert torch.allclose(model(**batch).loss_mcm, whole, atol=1e-6)
    assert rows_seen == [4, 4, 8, 8]


def test_mcm_vocabulary_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="mcm_vocabulary"):
        tiny_config(mcm_vocabulary="sampled")
    model = DecdModel(tiny_config(mcm_vocabulary="batch"))
    model.save_pretrained(tmp_path)
    assert DecdModel.from_pretrained(tmp_path).config.mcm_vocabulary == "batch"
    assert tiny_config().mcm_vocabulary == "full"  # the paper's objective unless asked
    for bad in (0, 1.5, "half"):
        with pytest.raises(ValueError, match="mcm_fraction"):
            tiny_config(mcm_fraction=bad)
    DecdModel(tiny_config(mcm_fraction=0.25)).save_pretrained(tmp_path)
    assert DecdModel.from_pretrained(tmp_path).config.mcm_fraction == 0.25
    assert tiny_config().mcm_fraction == 1.0  # every pair, as the paper


def test_outputs_are_normalised_and_logits_scaled():
    torch.manual_seed(0)
    model = DecdModel(tiny_config()).eval()
    batch = random_batch(model.config, with_mcm=False)
    with torch.no_grad():
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"])
        text = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
        image = model.get_image_features(batch["pixel_values"]).pooler_output
    assert output.loss is None
    assert text.shape == image.shape == (len(batch["input_ids"]), model.config.projection_dim)
    assert text.dtype == torch.float32
    assert torch.allclose(output.text_embeds, F.normalize(text, dim=-1), atol=1e-6)
    assert torch.allclose(output.image_embeds.norm(dim=-1), torch.ones(len(image)), atol=1e-5)
    expected = output.text_embeds @ output.image_embeds.t() / model.config.temperature
    assert torch.allclose(output.logits_per_text, expected, atol=1e-4)
    assert torch.equal(output.logits_per_image, output.logits_per_text.t())


def test_learnable_temperature_gets_gradient():
    torch.manual_seed(0)
    model = DecdModel(tiny_config(learnable_temperature=True))
    model(**random_batch(model.config, with_mcm=False)).loss.backward()
    assert model.logit_scale.grad is not None
    assert math.isclose(model.temperature.item(), 0.02, rel_tol=1e-5)


def test_caption_quality_modes():
    image, text = _embeddings(seed=3)
    ids = torch.arange(12) // 3
    sdm = sew_loss(image, text, ids, None, margin=0.0, temperature=0.05)
    # q = 0 everywhere means no margin at all.
    assert torch.allclose(sew_loss(image, text, ids, torch.zeros(12), margin=0.2, temperature=0.05), sdm)
    # `None` quality means q = 1 (the "uniform" mode).
    uniform = sew_loss(image, text, ids, torch.ones(12), margin=0.2, temperature=0.05)
    assert torch.allclose(sew_loss(image, text, ids, None, margin=0.2, temperature=0.05), uniform)
    # Informative captions (higher q) get a larger margin, so a larger loss.
    half = sew_loss(image, text, ids, torch.full((12,), 0.5), margin=0.2, temperature=0.05)
    assert sdm < half < uniform

    torch.manual_seed(0)
    batch = random_batch(tiny_config(), with_mcm=False)
    losses = {}
    for mode in ("density", "uniform", "none"):
        torch.manual_seed(0)
        model = DecdModel(tiny_config(caption_quality=mode, sew_margin=0.2))
        losses[mode] = model(**batch).loss_sew.item()
    low_quality = dict(batch, caption_quality=torch.zeros_like(batch["caption_quality"]))
    torch.manual_seed(0)
    assert math.isclose(DecdModel(tiny_config(sew_margin=0.2))(**low_quality).loss_sew.item(), losses["none"],
                        rel_tol=1e-5)
    assert losses["none"] < losses["density"] < losses["uniform"]

    # Density margins need each caption's quality; SDM (no margin) does not.
    without_quality = {k: v for k, v in batch.items() if k != "caption_quality"}
    with pytest.raises(ValueError, match="caption_quality"):
        DecdModel(tiny_config(sew_margin=0.1))(**without_quality)
    torch.manual_seed(0)
    assert math.isclose(DecdModel(tiny_config(sew_margin=0))(**without_quality).loss_sew.item(), losses["none"],
                        rel_tol=1e-5)


# ---- building from CLIP -----------------------------------------------------------------------------
def _text_batch(eos=999, bos=998, batch=3, length=9):
    ids = torch.randint(0, 990, (batch, length), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = bos
    attention = torch.ones_like(ids)
    ids[0, 5] = eos
    ids[0, 6:] = eos
    attention[0, 6:] = 0
    ids[1:, -1] = eos
    return ids, attention


def test_from_clip_square_matches_clip_features(tmp_path):
    clip, folder = _tiny_clip(tmp_path)
    model = DecdModel.from_clip(str(folder), image_size=(32, 32), decoder_hidden_size=32,
                                decoder_attention_heads=4, decoder_intermediate_size=64).eval()
    assert model.config.mask_token_id == 1000 and model.config.text_config.vocab_size == 1001
    assert model.config.projection_dim == 24
    ids, attention = _text_batch()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_text = clip.get_text_features(input_ids=ids, attention_mask=attention).pooler_output
        expected_image = clip.get_image_features(pixel_values=pixels).pooler_output
        assert torch.allclose(model.get_text_features(ids, attention).pooler_output, expected_text, atol=1e-5)
        assert torch.allclose(model.get_image_features(pixels).pooler_output, expected_image, atol=1e-5)
    # The mask token's embedding starts at the mean of CLIP's token embeddings.
    tokens = model.text_model.embeddings.token_embedding.weight
    assert torch.allclose(tokens[1000], clip.text_model.embeddings.token_embedding.weight.mean(0), atol=1e-6)


def test_from_clip_non_square_resizes_position_embeddings_once(tmp_path):
    clip, folder = _tiny_clip(tmp_path)
    model = DecdModel.from_clip(str(folder), image_size=(48, 16), decoder_hidden_size=32,
                                decoder_attention_heads=4, decoder_intermediate_size=64)
    positions = model.vision_model.embeddings.position_embedding.weight
    assert positions.shape == (6 * 2 + 1, 48)  # 48x16 crop, patch 8 -> 6x2 grid + CLS
    original = clip.vision_model.embeddings.position_embedding.weight
    assert torch.equal(positions[0], original[0])  # CLS kept
    grid = original[1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 2), mode="bicubic", align_corners=False)
    assert torch.allclose(positions[1:], expected.permute(0, 2, 3, 1).reshape(12, 48), atol=1e-6)
    # Stored at that size: a save/load round trip keeps 13 rows and needs no interpolation.
    model.save_pretrained(tmp_path / "decd")
    reloaded = DecdModel.from_pretrained(tmp_path / "decd")
    assert reloaded.vision_model.embeddings.position_embedding.weight.shape == (13, 48)
    with torch.no_grad():
        features = reloaded.get_image_features(torch.randn(2, 3, 48, 16)).pooler_output
    assert features.shape == (2, 24)


def test_from_clip_resolves_hub_names_from_the_cache_offline(tmp_path, monkeypatch):
    _, folder = _tiny_clip(tmp_path)
    use_offline_hub_cache(monkeypatch, hub_cache(tmp_path, folder, "openai/clip-vit-base-patch16"))
    model = DecdModel.from_clip("openai/clip-vit-base-patch16", image_size=(48, 16))
    assert model.config.base_model == "openai/clip-vit-base-patch16"
    assert model.vision_model.embeddings.position_embedding.weight.shape[0] == 13


def test_resize_position_embedding_identity_for_same_grid():
    weight = torch.randn(1 + 16, 8)
    assert torch.equal(resize_position_embedding(weight, (4, 4)), weight)
    with pytest.raises(ValueError, match="square grid"):
        resize_position_embedding(torch.randn(1 + 12, 8), (4, 4))


# ---- bad input ---------------------------------------------------------------------------------------
def test_config_rejects_image_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        DecdConfig.tiny(image_size=(130, 64))
    with pytest.raises(ValueError, match="caption_quality"):
        DecdConfig.tiny(caption_quality="length")


def test_model_rejects_wrong_pixel_size():
    model = DecdModel(tiny_config())
    with pytest.raises(ValueError, match=r"expects 128x64"):
        model.get_image_features(torch.randn(1, 3, 224, 224)).pooler_output
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        model.get_image_features(torch.randn(1, 1, 128, 64)).pooler_output


def test_overlong_captions_are_cut_keeping_end_of_text():
    torch.manual_seed(0)
    model = DecdModel(tiny_config()).eval()
    ids = torch.randint(0, 49000, (1, 100))
    ids[0, 0], ids[0, -1] = 49406, 49407
    with pytest.warns(UserWarning, match="exceed the 77-token context"):
        features = model.get_text_features(ids, torch.ones_like(ids)).pooler_output
    cut = ids[:, :77].clone()
    cut[0, -1] = 49407
    with torch.no_grad():
        assert torch.allclose(features, model.get_text_features(cut, torch.ones_like(cut)).pooler_output, atol=1e-6)


def test_other_model_type_checkpoint_is_refused(tmp_path):
    _, folder = _tiny_clip(tmp_path)
    with pytest.raises(ValueError, match=r"'clip' checkpoint, not a DECD one.*from_clip"):
        DecdModel.from_pretrained(folder)


def test_pickled_weights_are_never_loaded(tmp_path, monkeypatch):
    model = DecdModel(tiny_config())
    model.save_pretrained(tmp_path / "ok")
    assert (tmp_path / "ok" / "model.safetensors").exists()

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", refuse)
    DecdModel.from_pretrained(tmp_path / "ok")  # safetensors: no unpickling

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(OSError, match="safetensors"):
        DecdModel.from_pretrained(pickled)


# ---- a compiled training step: fixed shapes, no graph break ---------------------------------------------
def _mcm_batch(config, seed=0):
    """A training batch whose captions differ in length and in how many tokens are masked (1 to 5)."""
    batch = random_batch(config, batch_size=8, length=14, with_mcm=True, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.full_like(batch["input_ids"], -100)
    for row in range(8):
        count = 1 + row % 5
        positions = 1 + torch.randperm(10, generator=generator)[:count]
        labels[row, positions] = batch["input_ids"][row, positions]
    batch["mcm_labels"] = labels
    batch["masked_input_ids"] = torch.where(labels != -100, torch.full_like(labels, 49408), batch["input_ids"])
    return batch


@pytest.mark.parametrize("vocabulary", ["full", "batch"])
@pytest.mark.parametrize("fraction, max_positions", [(1.0, None), (0.5, None), (0.25, 3), (1.0, 2)])
def test_fixed_shape_mcm_equals_the_data_dependent_mcm(vocabulary, fraction, max_positions, monkeypatch):
    """What a compiled step computes (`_fixed_shape_mcm_loss`) is the eager step's MCM loss, on the same inputs and
    random draws (the rows `mcm_fraction` samples), to 1e-6 in float32."""
    torch.manual_seed(0)
    model = DecdModel(tiny_config(mcm_vocabulary=vocabulary, mcm_fraction=fraction,
                                  mcm_max_positions=max_positions)).train()
    batch = _mcm_batch(model.config)
    losses = {}
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda compiling=compiling: compiling)
        torch.manual_seed(7)  # the same rows drawn both times
        losses[compiling] = model(**batch).loss_mcm
    assert torch.isfinite(losses[False])
    fixed, data_dependent = float(losses[True].detach()), float(losses[False].detach())
    assert abs(fixed - data_dependent) <= 1e-6 * max(1.0, abs(data_dependent))


def test_a_training_forward_compiles_without_a_graph_break():
    torch.manual_seed(0)
    model = DecdModel(tiny_config(num_identities=4, id_weight=0.5, mcm_vocabulary="batch", mcm_fraction=0.5,
                                  learnable_temperature=True)).train()
    batch = _mcm_batch(model.config)
    batch["person_ids"] = torch.arange(8) % 4
    explanation = torch._dynamo.explain(model)(**batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_and_eager_steps_give_the_same_losses_and_gradients():
    """A compiled training step (inductor, the batch-vocabulary MCM on half the pairs, an identity loss) against the
    eager one: losses to 1e-5 and every gradient to 1e-4 in relative norm, 1e-6 absolute (float32; the two sum in different
    orders). The whole-vocabulary head's fixed-shape form is checked against the eager one above."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = DecdModel(tiny_config(num_identities=4, id_weight=0.5, mcm_vocabulary="batch",
                                      mcm_fraction=0.5)).train()
        batch = _mcm_batch(model.config)
        batch["person_ids"] = torch.arange(8) % 4
        step = torch.compile(model) if compiled else model
        torch.manual_seed(3)
        output = step(**batch)
        output.loss.backward()
        results.append((output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    (eager, eager_grads), (compiled, compiled_grads) = results
    for name in ("loss", "loss_sew", "loss_mcm", "loss_id"):
        assert torch.allclose(getattr(compiled, name), getattr(eager, name), rtol=1e-5, atol=1e-6), name
    assert eager_grads.keys() == compiled_grads.keys() and "mcm_head.decoder.weight" in eager_grads
    for name, grad in eager_grads.items():
        assert (compiled_grads[name] - grad).norm() <= 1e-4 * grad.norm() + 1e-6, name  # (key biases: zero, noise)
