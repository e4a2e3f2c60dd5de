"""The transformers pipeline ("text-based-person-search", decd.pipeline): by description and by photo, over an
index folder or a list of images, with the ranking and wording of `GalleryIndex` / `describe_match`."""

import numpy as np
import pytest
import torch
from PIL import Image

import decd.pipeline  # noqa: F401  (registers the task)
from decd.search import StaleIndexError, describe_match

from .milvus_fixtures import milvus_gallery, read_metadata_rows  # noqa: F401
from .search_fixtures import photo_gallery, workspace  # noqa: F401

QUERY = "a man in a red shirt and blue trousers"


def test_pipeline_returns_the_index_search_top_k(workspace):
    import decd.pipeline  # noqa: F401  (registers the task)
    from transformers import pipeline

    index = workspace["index"]
    search = pipeline("text-based-person-search", model=str(workspace["model_dir"]),
                      gallery=str(workspace["root"] / "index"), device="cpu")
    expected = index.search_text(workspace["model"], workspace["processor"], QUERY, top_k=5)
    matches = search(QUERY, top_k=5)
    assert [match["index"] for match in matches] == expected.indices[0].tolist()
    assert [match["path"] for match in matches] == expected.paths[0]
    np.testing.assert_allclose([match["score"] for match in matches], expected.scores[0].numpy(), atol=1e-5)
    assert len(search([QUERY, "a woman"], top_k=2)) == 2

    # A list of images gives the same ranking (encoded on the fly; no paths for PIL images).
    images = [Image.open(workspace["gallery"] / path).convert("RGB") for path in index.paths]
    in_memory = pipeline("text-based-person-search", model=workspace["model"], processor=workspace["processor"],
                         gallery=images, device="cpu")
    matches = in_memory(QUERY, top_k=5)
    assert [match["index"] for match in matches] == expected.indices[0].tolist()
    assert "path" not in matches[0]

    with pytest.raises(StaleIndexError):
        pipeline("text-based-person-search", model=str(workspace["other_model_dir"]),
                 gallery=str(workspace["root"] / "index"), device="cpu")


def test_pipeline_accepts_a_photo_besides_a_description(setup):
    from transformers import pipeline

    search = pipeline("text-based-person-search", model=setup["model"], processor=setup["processor"],
                      gallery=setup["root"] / "index")
    query = setup["gallery"] / setup["index"].paths[1]
    expected = setup["index"].search_image(setup["model"], setup["processor"], query, top_k=3)
    by_path = search({"image": str(query)}, top_k=3)
    with Image.open(query) as picture:
        by_pil = search(picture.copy(), top_k=3)
    assert [match["path"] for match in by_path] == expected.paths[0] == [match["path"] for match in by_pil]
    first = by_path[0]
    assert first["rank"] == 1 and first["label"] == describe_match(1, first["score"], len(setup["index"]))["label"]
    by_text = search("a man in a red shirt", top_k=2)
    assert [match["rank"] for match in by_text] == [1, 2] and "top_percent" in by_text[0]
    with pytest.raises(ValueError, match="query dict"):
        search({"picture": str(query)})


def test_pipeline_searches_a_milvus_collection_with_a_filter(milvus_gallery, tmp_path):
    from transformers import pipeline

    from decd.search import GalleryIndexError, MilvusGallery

    model, processor, local = milvus_gallery["model"], milvus_gallery["processor"], milvus_gallery["index"]
    store = tmp_path / "gallery.db"
    MilvusGallery.build(model, processor, milvus_gallery["gallery"], f"{store}/crops", show_progress=False,
                        metadata=milvus_gallery["metadata"], model_id=str(milvus_gallery["model_dir"]))
    search = pipeline("text-based-person-search", model=str(milvus_gallery["model_dir"]), gallery=f"{store}/crops",
                      device="cpu")
    expected = local.search_text(model, processor, QUERY, top_k=12)
    matches = search(QUERY, top_k=5)
    assert [match["path"] for match in matches] == expected.paths[0][:5]
    np.testing.assert_allclose([match["score"] for match in matches], expected.scores[0, :5].numpy(), atol=1e-5)
    assert matches[0]["label"] == describe_match(1, matches[0]["score"], 12)["label"]
    cameras = {path: row["camera"] for path, row in read_metadata_rows(milvus_gallery["metadata"]).items()}
    named = pipeline("text-based-person-search", model=model, processor=processor, gallery=store,
                     gallery_collection="crops")  # the collection given apart from the store
    filtered = named(QUERY, top_k=10, filter='camera == "c1"')
    assert [match["path"] for match in filtered] == [path for path in expected.paths[0] if cameras[path] == "c1"]
    in_c1 = sum(camera == "c1" for camera in cameras.values())  # "top p% of N" counts the images the filter lets in
    assert [match["label"] for match in filtered] == [describe_match(rank, match["score"], in_c1)["label"]
                                                      for rank, match in enumerate(filtered, start=1)]
    assert filtered[-1]["top_percent"] == 100.0 and f"of {in_c1}" in filtered[0]["label"]
    photo = milvus_gallery["gallery"] / local.paths[2]
    by_photo = named({"image": str(photo)}, top_k=3)
    assert [match["path"] for match in by_photo] == local.search_image(model, processor, photo, top_k=3).paths[0]
    on_disk = pipeline("text-based-person-search", model=model, processor=processor, gallery=local.path)
    with pytest.raises(GalleryIndexError, match="needs a gallery in Milvus"):
        on_disk(QUERY, filter='camera == "c1"')


def test_pipeline_top_k_rule_and_an_empty_list_of_queries(setup):
    from transformers import pipeline

    import decd.pipeline  # noqa: F401

    search = pipeline("text-based-person-search", model=str(setup["model_dir"]), gallery=setup["index"])
    assert search([]) == []
    for bad in (0, -5, 1.5, "3"):
        with pytest.raises(ValueError, match=r"top_k must be a positive whole number"):
            search("a man in a red shirt", top_k=bad)
    with pytest.raises(ValueError, match=r"top_k must be a positive whole number, got 0"):
        setup["index"].search(torch.zeros(setup["index"].embedding_dim), top_k=0, backend="faiss")
