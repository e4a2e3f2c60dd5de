"""One spine: one way to open an image, one way to load a model, one way to embed; CLIPModel's contract.

Every entry point (training collator, evaluation, index build, search pipeline, Inference Endpoints
handler, app) must see the same pixels and give the same embeddings for the same input.
"""

import base64
import json
import shutil
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import ImageOps
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, pipeline
from transformers.modeling_outputs import BaseModelOutputWithPooling

import decd.pipeline  # noqa: F401  (registers the search pipeline)
from decd.data import load_person_search
from decd.hub.publish import _hyperparameters_from
from decd.retrieval import evaluate_retrieval
from decd.search import GalleryIndex
from decd.training import DecdTrainer, DecdTrainingArguments, DecdTrainingCollator
from inference_decd import ModelLoadError, embed_images, embed_texts, load_model
from modeling_decd import DecdModel
from image_loading_decd import load_image
from processing_decd import DecdProcessor
from tokenization_decd import default_clip_tokenizer

from .helpers import tiny_config

CAPTION = "a woman in a red coat carrying a black backpack"


# ----------------------------------------------------------------------------------------------------
# The awkward files
# ----------------------------------------------------------------------------------------------------
def _person(width=48, height=96):
    """A small RGB picture with structure in both directions (so a rotation or flip shows)."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], axis=-1).astype(np.uint8)
    return PIL.Image.fromarray(array)


def _awkward_files(folder):
    """name -> path of the files every entry point must read alike."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    rotated = _person()
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated.save(folder / "exif_rotated.jpg", exif=exif.tobytes(), quality=95)
    ramp = (np.arange(96 * 48).reshape(96, 48) * 14).astype(np.uint16)
    PIL.Image.fromarray(ramp).save(folder / "sixteen_bit.png")
    PIL.Image.fromarray((ramp / 65535.0).astype(np.float32)).save(folder / "float.tiff")
    rgba = _person().convert("RGBA")
    alpha = np.repeat(np.linspace(0, 255, 96).astype(np.uint8)[:, None], 48, axis=1)
    rgba.putalpha(PIL.Image.fromarray(alpha))  # transparent at the top, opaque at the bottom
    rgba.save(folder / "alpha.png")
    palette = _person().convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
    palette.save(folder / "palette.png", transparency=0)
    _person().convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    large = _person().resize((4000, 3000), PIL.Image.Resampling.BILINEAR)
    large.save(folder / "large.jpg", quality=90)
    for path in sorted(folder.iterdir()):
        files[path.name] = path
    return files


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("spine")
    files = _awkward_files(root / "gallery")
    torch.manual_seed(0)
    built = DecdModel(tiny_config(num_identities=len(files)))
    built.save_pretrained(root / "model")
    DecdProcessor(image_size=built.config.image_size).save_pretrained(root / "model")
    model, processor = load_model(root / "model", device="cpu")  # as every entry point loads it
    # Each split names its own byte-identical copies: one file in two splits would leak test data into training.
    for split in ("train", "test"):
        (root / "imgs" / split).mkdir(parents=True)
        for name, path in files.items():
            shutil.copyfile(path, root / "imgs" / split / name)
    records = [dict(id=index + 1, file_path=f"{split}/{name}",
                    captions=[f"{CAPTION} number {index}"], split=split)
               for split in ("train", "test") for index, name in enumerate(sorted(files))]
    (root / "annotations.json").write_text(json.dumps(records))
    return dict(root=root, files=files, names=sorted(files), model=model, processor=processor)


class _RecordingModel:
    """Records the pixel_values a model's image tower receives, per call."""

    def __init__(self, model):
        self.seen = []
        original = model.get_image_features

        def get_image_features(pixel_values, **kwargs):
            self.seen.append(pixel_values.detach().clone())
            return original(pixel_values, **kwargs)

        model.get_image_features = get_image_features
        self.model = model

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        del self.model.get_image_features  # back to the class's method

    def rows(self):
        return torch.cat(self.seen)


def _through_training(setup):
    train = load_person_search("custom", setup["root"], split="train",
                               annotation_file=setup["root"] / "annotations.json")
    trainer = DecdTrainer(model=setup["model"], train_dataset=train, processing_class=setup["processor"],
                          data_collator=DecdTrainingCollator(setup["processor"], augment=False, mask_captions=False),
                          args=DecdTrainingArguments(output_dir=str(setup["root"] / "run"), per_device_train_batch_size=1,
                                                 report_to=[], use_cpu=True))
    by_identity = {}
    for batch in trainer.get_train_dataloader():
        by_identity[int(batch["person_ids"][0])] = batch["pixel_values"][0]
    return [by_identity[index] for index in range(len(setup["names"]))]  # ids are assigned in name order


def _through_evaluation(setup):
    test = load_person_search("custom", setup["root"], split="test", annotation_file=setup["root"] / "annotations.json")
    with _RecordingModel(setup["model"]) as recorder:
        evaluate_retrieval(setup["model"], setup["processor"], test["gallery"], test["queries"], batch_size=1,
                           show_progress=False)
    return list(recorder.rows())


def _through_index(setup, tmp_path):
    with _RecordingModel(setup["model"]) as recorder:
        index = GalleryIndex.build(setup["model"], setup["processor"], setup["root"] / "gallery", tmp_path / "index",
                                   batch_size=1, show_progress=False)
    assert index.paths == setup["names"] and index.skipped == []
    return list(recorder.rows()), index


def _through_pipeline(setup):
    paths = [str(setup["files"][name]) for name in setup["names"]]
    with _RecordingModel(setup["model"]) as recorder:
        search = pipeline("text-based-person-search", model=setup["model"], processor=setup["processor"],
                          gallery=paths, gallery_batch_size=1)
    return list(recorder.rows()), search


def _through_handler(setup):
    import handler as checkout_handler

    endpoint = checkout_handler.EndpointHandler(str(setup["root"] / "model"))
    images = [base64.b64encode(setup["files"][name].read_bytes()).decode() for name in setup["names"]]
    with _RecordingModel(endpoint.model) as recorder:
        answer = endpoint({"inputs": {"text": CAPTION, "image": images}})
    return list(recorder.rows()), answer, endpoint


def test_awkward_files_give_identical_pixels_through_every_entry_point(setup, tmp_path):
    expected = [setup["processor"](images=str(setup["files"][name]))["pixel_values"][0] for name in setup["names"]]
    index_rows, _ = _through_index(setup, tmp_path)
    pipeline_rows, _ = _through_pipeline(setup)
    handler_rows, _, _ = _through_handler(setup)
    entry_points = {
        "training collator": _through_training(setup),
        "evaluation gallery": _through_evaluation(setup),
        "index build": index_rows,
        "search pipeline": pipeline_rows,
        "endpoint handler": handler_rows,
    }
    for entry_point, rows in entry_points.items():
        assert len(rows) == len(expected), entry_point
        for name, row, reference in zip(setup["names"], rows, expected):
            assert torch.equal(row, reference), f"{entry_point} reads {name} differently"


def test_awkward_files_are_read_by_their_content(setup):
    files, size = setup["files"], setup["processor"].image_size
    # EXIF orientation is applied: the picture is the upright (transposed) one.
    with PIL.Image.open(files["exif_rotated.jpg"]) as raw:
        upright = ImageOps.exif_transpose(raw).convert("RGB")
    assert load_image(files["exif_rotated.jpg"]).size == upright.size == (96, 48)
    assert np.array_equal(np.asarray(load_image(files["exif_rotated.jpg"])), np.asarray(upright))
    # 16-bit and float images are scaled by their range, not clipped to an almost white picture.
    ramp8 = np.rint(np.arange(96 * 48).reshape(96, 48) * 14 / 65535 * 255).astype(np.uint8)
    for name in ("sixteen_bit.png", "float.tiff"):
        grey = np.asarray(load_image(files[name]))
        assert grey.shape == (96, 48, 3) and np.abs(grey[..., 0].astype(int) - ramp8).max() <= 1, name
        assert grey.mean() < 200, name
    # Alpha is composited onto white (the fully transparent first row is white).
    assert np.asarray(load_image(files["alpha.png"]))[0].min() == 255
    assert np.asarray(load_image(files["palette.png"])).shape == (96, 48, 3)
    # A large JPEG is decoded reduced (draft mode), to no less than twice the model's input size.
    large = load_image(files["large.jpg"], size=size)
    assert large.size[0] >= 2 * size[1] and large.size[1] >= 2 * size[0] and large.size[0] <= 1000
    assert load_image(files["large.jpg"]).size == (4000, 3000)  # without a target size: full resolution


def test_pixel_limit_is_one_clear_error_everywhere(setup, tmp_path):
    small_limit = DecdProcessor(image_size=(128, 64), max_image_pixels=1_000_000)
    with pytest.raises(ValueError, match=r"large\.jpg has 4000x3000 = 12,000,000 pixels, more than the limit"):
        small_limit(images=str(setup["files"]["large.jpg"]))
    with pytest.raises(ValueError, match=r"large\.jpg has 4000x3000"):
        small_limit.load_image(setup["files"]["large.jpg"].read_bytes(), name="large.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        index = GalleryIndex.build(setup["model"], small_limit, setup["root"] / "gallery", tmp_path / "index",
                                   show_progress=False)
    assert [(item["path"], "more than the limit" in item["error"]) for item in index.skipped] == [("large.jpg", True)]


def test_every_entry_point_gives_identical_embeddings(setup, tmp_path):
    model, processor, names = setup["model"], setup["processor"], setup["names"]
    reference_images = embed_images(model, processor, [str(setup["files"][name]) for name in names], batch_size=1)
    reference_text = embed_texts(model, processor, [CAPTION])
    _, index = _through_index(setup, tmp_path)
    _, search = _through_pipeline(setup)
    _, answer, endpoint = _through_handler(setup)
    assert torch.equal(torch.from_numpy(np.asarray(index.embeddings)), reference_images)
    assert torch.equal(torch.from_numpy(np.asarray(search.gallery_index.embeddings)), reference_images)
    assert torch.equal(search._forward({"description": CAPTION})["text_embeds"], reference_text)
    cosine = (reference_text @ reference_images.T)[0]
    for match in search(CAPTION, top_k=len(names)):
        assert match["score"] == pytest.approx(float(cosine[match["index"]]), abs=1e-6)
    for entry in answer:  # the handler's scores are the same cosines
        assert entry["score"] == pytest.approx(float(cosine[entry["index"]]), abs=1e-6)
    assert torch.equal(embed_texts(endpoint.model, endpoint.processor, [CAPTION]), reference_text)
    test = load_person_search("custom", setup["root"], split="test", annotation_file=setup["root"] / "annotations.json")
    _, similarity = evaluate_retrieval(model, processor, test["gallery"], test["queries"], batch_size=1,
                                       show_progress=False, return_similarity=True)
    queries = embed_texts(model, processor, list(test["queries"]["caption"]), batch_size=1)
    assert torch.equal(similarity, queries @ reference_images.T)


def test_embed_functions_return_normalised_float32_in_input_order(setup):
    model, processor = setup["model"], setup["processor"]
    images = [_person(), PIL.Image.new("RGB", (30, 60), (250, 0, 0)), _person(20, 80)]
    together = embed_images(model, processor, images, batch_size=2)
    alone = torch.cat([embed_images(model, processor, [image]) for image in images])
    assert together.dtype == torch.float32 and together.device.type == "cpu"
    assert torch.allclose(together.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(together, alone, atol=1e-6)
    texts = embed_texts(model, processor, ["a man", CAPTION, "a person in green"], batch_size=2)
    assert texts.shape == (3, model.config.projection_dim)
    assert torch.allclose(texts[1], embed_texts(model, processor, CAPTION)[0], atol=1e-6)
    model.train()
    embed_texts(model, processor, "a man")
    assert model.training  # the mode is restored
    model.eval()


def test_embed_functions_take_one_item_or_a_sequence_and_name_anything_else(setup, tmp_path):
    model, processor = setup["model"], setup["processor"]
    path = tmp_path / "one.png"
    _person().save(path)
    assert torch.equal(embed_images(model, processor, str(path)), embed_images(model, processor, [str(path)]))
    assert torch.equal(embed_images(model, processor, path), embed_images(model, processor, [path]))
    for bad, kind in ((None, "NoneType"), (3, "int")):
        with pytest.raises(TypeError, match=rf"texts must be one item or a sequence of them, got {kind}"):
            embed_texts(model, processor, bad)
        with pytest.raises(TypeError, match=rf"images must be one item or a sequence of them, got {kind}"):
            embed_images(model, processor, bad)


# ----------------------------------------------------------------------------------------------------
# One way to load a model
# ----------------------------------------------------------------------------------------------------
def test_load_model_checks_type_and_sets_mode_device_and_dtype(setup, tmp_path):
    folder = setup["root"] / "model"
    model, processor = load_model(folder, device="cpu", dtype=torch.bfloat16)
    assert isinstance(model, DecdModel) and isinstance(processor, DecdProcessor)
    assert not model.training and model.device.type == "cpu" and model.dtype == torch.bfloat16
    CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4),
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, image_size=32, patch_size=16),
                         projection_dim=16)).save_pretrained(tmp_path / "clip")
    with pytest.raises(ModelLoadError, match=r"could not load the model .*clip.*'clip' checkpoint, not a DECD one"):
        load_model(tmp_path / "clip")
    with pytest.raises(ModelLoadError, match="could not load the model .*missing"):
        load_model(tmp_path / "missing")
    # A file of the model (config.json, the weights) names the mistake and the folder to give instead.
    with pytest.raises(ModelLoadError, match=rf"it is a file; pass the folder that holds it \('{folder}'\)"):
        load_model(folder / "config.json")
    # A folder with the weights but no processor files gets the default processor, with a warning.
    setup["model"].save_pretrained(tmp_path / "weights-only")
    with pytest.warns(UserWarning, match="no loadable processor"):
        _, default = load_model(tmp_path / "weights-only", device="cpu")
    assert default.image_size == setup["model"].config.image_size


# ----------------------------------------------------------------------------------------------------
# transformers 5's CLIPModel contract
# ----------------------------------------------------------------------------------------------------
def clip_style_scores(model, processor, texts, images):
    """Written for transformers' CLIPModel; must run unchanged on DecdModel."""
    with torch.no_grad():
        text = model.get_text_features(**processor(text=texts, return_tensors="pt", padding=True))
        image = model.get_image_features(**processor(images=images, return_tensors="pt"))
        output = model(**processor(text=texts, images=images, return_tensors="pt", padding=True))
        as_tuple = model.get_image_features(**processor(images=images, return_tensors="pt"), return_dict=False)
    assert isinstance(text, BaseModelOutputWithPooling) and isinstance(image, BaseModelOutputWithPooling)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], image.pooler_output)
    assert torch.allclose(output.text_embeds, torch.nn.functional.normalize(text.pooler_output, dim=-1), atol=1e-6)
    assert torch.allclose(output.text_model_output.pooler_output, text.pooler_output, atol=1e-6)
    assert torch.allclose(output.vision_model_output.pooler_output, image.pooler_output, atol=1e-6)
    assert text.last_hidden_state.shape[:2] == processor(text=texts, padding=True, return_tensors="pt")[
        "input_ids"].shape
    cosine = output.image_embeds @ output.text_embeds.T
    return cosine, output.logits_per_image / cosine


def test_a_clip_helper_runs_unchanged_on_decd():
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    clip = CLIPModel(CLIPConfig(text_config=dict(sizes, vocab_size=49408), projection_dim=16,
                                vision_config=dict(sizes, image_size=64, patch_size=16))).eval()
    clip_processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 64}, crop_size=64),
                                   default_clip_tokenizer())
    decd = DecdModel(tiny_config()).eval()
    decd_processor = DecdProcessor(image_size=decd.config.image_size)
    texts, images = ["a man in a blue jacket", CAPTION], [_person(), _person(40, 40)]
    for model, processor in ((clip, clip_processor), (decd, decd_processor)):
        cosine, scale = clip_style_scores(model, processor, texts, images)
        assert cosine.shape == (2, 2)
        assert torch.allclose(scale, scale[0, 0].expand(2, 2), rtol=1e-4)  # logits = scale x cosine


def test_unknown_keywords_are_errors_not_silently_dropped():
    model = DecdModel(tiny_config()).eval()
    batch = DecdProcessor(image_size=model.config.image_size)(text=[CAPTION, "a man"], images=[_person(), _person()])
    with pytest.raises(TypeError, match=r"'person_id' \(did you mean 'person_ids'\?\)"):
        model(**batch, person_id=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"'interpolate_pos_embedding' \(did you mean 'interpolate_pos_encoding'"):
        model.get_image_features(batch["pixel_values"], interpolate_pos_embedding=True)
    with pytest.raises(TypeError, match="'temperature'"):
        model.get_text_features(batch["input_ids"], temperature=0.1)
    hidden = model.get_text_features(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
    assert len(hidden.hidden_states) == model.config.text_config.num_hidden_layers + 1


def test_no_split_modules_name_real_classes_and_interpolation_works():
    model = DecdModel(tiny_config()).eval()
    present = {type(module).__name__ for module in model.modules()}
    assert set(model._no_split_modules) <= present
    height, width = model.config.image_size
    pixels = torch.randn(2, 3, height, width)
    with torch.no_grad():
        same = model.get_image_features(pixels, interpolate_pos_encoding=True).pooler_output
        assert torch.equal(same, model.get_image_features(pixels).pooler_output)
        other = model.get_image_features(torch.randn(2, 3, height + 32, width), interpolate_pos_encoding=True)
        assert other.last_hidden_state.shape[1] == (height + 32) // 16 * (width // 16) + 1
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model.get_image_features(torch.randn(1, 3, height + 32, width))


# ----------------------------------------------------------------------------------------------------
# One home for each setting
# ----------------------------------------------------------------------------------------------------
def test_masking_and_quality_settings_live_in_the_processor_only(tmp_path):
    config = tiny_config()
    assert not hasattr(config, "mask_probability") and not hasattr(config, "quality_reference_words")
    processor = DecdProcessor(image_size=config.image_size, mask_probability=0.3, quality_reference_words=7)
    processor.save_pretrained(tmp_path)
    reloaded = DecdProcessor.from_pretrained(tmp_path)
    assert (reloaded.mask_probability, reloaded.quality_reference_words) == (0.3, 7)
    card = _hyperparameters_from(DecdModel(config), reloaded, None)
    assert card["mask_probability (MCM)"] == 0.3 and card["quality_reference_words"] == 7
