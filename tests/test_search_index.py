"""decd.search.index: `GalleryIndex` searches by description and by photo equal a direct cosine ranking, and
refuse bad queries and an index built by another model."""

import numpy as np
import pytest
import torch
from PIL import Image

from decd.search import StaleIndexError
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .search_fixtures import _brute_force, _direct, photo_gallery, workspace  # noqa: F401

QUERY = "a man in a red shirt and blue trousers"


# ---------------------------------------------------------------------------------------------
# By description
# ---------------------------------------------------------------------------------------------


def test_text_search_equals_brute_force_cosine_ranking(workspace):
    index, model, processor = workspace["index"], workspace["model"], workspace["processor"]
    texts = [QUERY, "a woman with a backpack", "person wearing a hat"]
    result = index.search_text(model, processor, texts, top_k=len(index) + 5)  # clamped to the gallery size
    with torch.no_grad():
        batch = processor(text=texts, return_tensors="pt")
        queries = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    order, scores = _brute_force(queries, index.embeddings, len(index))
    assert result.indices.shape == (3, len(index))
    np.testing.assert_array_equal(result.indices.numpy(), order)
    np.testing.assert_allclose(result.scores.numpy(), scores, atol=1e-5)
    assert result.paths[0] == [index.paths[row] for row in order[0]]
    # Text given to `search` directly goes through the same path.
    again = index.search(texts[0], top_k=3, model=model, processor=processor)
    np.testing.assert_array_equal(again.indices.numpy(), order[:1, :3])


def test_search_rejects_bad_queries_and_backends(workspace):
    index = workspace["index"]
    with pytest.raises(ValueError, match=r"queries must be \[num_queries, 16\]"):
        index.search(torch.randn(2, 8))
    with pytest.raises(ValueError, match="backend"):
        index.search(torch.randn(1, 16), backend="annoy")
    with pytest.raises(ValueError, match="model"):
        index.search(QUERY)
    with pytest.raises(ValueError, match="empty"):
        index.search_text(workspace["model"], workspace["processor"], ["   "])


def test_index_from_another_model_is_refused(workspace):
    other = DecdModel.from_pretrained(workspace["other_model_dir"])
    with pytest.raises(StaleIndexError) as error:
        workspace["index"].search_text(other, workspace["processor"], QUERY)
    message = str(error.value)
    assert str(workspace["model_dir"].resolve()) in message
    assert str(workspace["other_model_dir"].resolve()) in message
    assert "rebuild the index" in message


# ---------------------------------------------------------------------------------------------
# By photo (re-identification)
# ---------------------------------------------------------------------------------------------


def test_search_image_matches_direct_image_cosine_and_finds_itself(setup):
    index, gallery = setup["index"], setup["gallery"]
    query = gallery / index.paths[4]
    result = index.search_image(setup["model"], setup["processor"], str(query), top_k=5)
    paths, scores = _direct(setup["model"], setup["processor"], gallery, index.paths, query)
    assert result.paths[0] == paths[:5] and result.paths[0][0] == index.paths[4]
    assert result.scores[0].tolist() == pytest.approx(scores[:5], abs=1e-5)
    with Image.open(query) as picture:  # a PIL image is the same query
        assert index.search_image(setup["model"], setup["processor"], picture.copy(), top_k=5).paths == result.paths


def test_search_image_refuses_a_stale_index_and_a_bad_image(setup, tmp_path):
    other = DecdModel.from_pretrained(setup["other_dir"]).eval()
    query = setup["gallery"] / setup["index"].paths[0]
    with pytest.raises(StaleIndexError, match="rebuild the index"):
        setup["index"].search_image(other, setup["processor"], query)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        setup["index"].search_image(setup["model"], setup["processor"], broken)


def test_results_whose_file_was_deleted_or_changed_since_indexing_are_flagged(tmp_path):
    from decd.search import GalleryIndex
    from inference_decd import embed_texts

    from .helpers import tiny_config

    torch.manual_seed(0)
    model, processor = DecdModel(tiny_config()).eval(), DecdProcessor(image_size=(128, 64))
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for number in range(4):
        Image.new("RGB", (20, 40), (60 * number, 20, 200)).save(gallery / f"{number}.png")
    index = GalleryIndex.build(model, processor, gallery, tmp_path / "index", show_progress=False)
    query = embed_texts(model, processor, "a person in blue")
    assert all(state is None for state in index.search(query, top_k=4).status[0])
    (gallery / "1.png").unlink()
    Image.new("RGB", (20, 40), (0, 255, 0)).save(gallery / "2.png")  # replaced: another size on disk
    result = GalleryIndex.load(tmp_path / "index").search(query, top_k=4)
    flagged = dict(zip(result.paths[0], result.status[0]))
    assert flagged == {"0.png": None, "1.png": "deleted", "2.png": "changed", "3.png": None}


def test_a_model_in_another_dtype_is_told_apart_from_another_model(tmp_path):
    from PIL import Image

    from decd.search import GalleryIndex

    from .helpers import tiny_config

    torch.manual_seed(0)
    model, processor = DecdModel(tiny_config()).eval(), DecdProcessor(image_size=(128, 64))
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    Image.new("RGB", (20, 40), (200, 20, 20)).save(gallery / "a.png")
    index = GalleryIndex.build(model, processor, gallery, tmp_path / "index", show_progress=False)
    with pytest.raises(StaleIndexError, match=r"in float32, model is .* in float16: the same weights in another "
                                              r"dtype, .* load the model in float32 \(dtype=torch.float32\)"):
        index.verify_model(model.half())
    torch.manual_seed(1)
    with pytest.raises(StaleIndexError, match=r"in float16: another model in another dtype; rebuild the index"):
        index.verify_model(DecdModel(tiny_config()).half())
