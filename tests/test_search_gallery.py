"""decd.search.gallery: `open_gallery` opens an index folder, a folder of images (unreadable ones skipped and
listed, like a build), a list of images or any `Gallery`, the same way for the pipeline, the app, the CLI
and the handler."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

from decd.search import (Gallery, GalleryIndex, GalleryIndexError, IndexNotFoundError, SkippedImagesWarning,
                         StaleIndexError, open_gallery)
from modeling_decd import DecdModel

from .search_fixtures import _build, five_images  # noqa: F401

BAD = b"this is not a png" * 20


@pytest.fixture
def folder_with_a_bad_image(setup, tmp_path):
    """The five PNGs in nested folders, and one file that is not an image (named like one)."""
    gallery = tmp_path / "crops"
    (gallery / "cam1").mkdir(parents=True)
    for number, image in enumerate(sorted(setup["gallery"].iterdir())):
        (gallery / ("cam1" if number % 2 else "") / image.name).write_bytes(image.read_bytes())
    (gallery / "cam1" / "broken.png").write_bytes(BAD)
    return gallery


def _one_skip_warning(record) -> str:
    skips = [item for item in record if issubclass(item.category, SkippedImagesWarning)]
    assert len(skips) == 1, [str(item.message) for item in record]
    return str(skips[0].message)


def test_open_gallery_loads_an_index_folder(setup, tmp_path):
    built = _build(setup, tmp_path / "index")
    index = open_gallery(setup["model"], setup["processor"], tmp_path / "index")
    assert index.path == tmp_path / "index" and index.paths == built.paths
    np.testing.assert_array_equal(np.asarray(index.embeddings), np.asarray(built.embeddings))
    assert open_gallery(None, None, str(tmp_path / "index"), verify=False).paths == built.paths  # no model: index only
    assert open_gallery(setup["model"], setup["processor"], index) is index


def test_open_gallery_encodes_an_image_folder_skipping_the_unreadable_image(setup, folder_with_a_bad_image, tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        index = open_gallery(setup["model"], setup["processor"], folder_with_a_bad_image, batch_size=2)
    message = _one_skip_warning(record)
    assert "skipped 1 unreadable image(s) of 6" in message and "cam1/broken.png" in message
    assert [item["path"] for item in index.skipped] == ["cam1/broken.png"]
    assert index.path is None and index.gallery_dir == folder_with_a_bad_image.resolve()
    assert len(index) == 5 and "cam1/broken.png" not in index.paths and index.paths == sorted(index.paths)
    assert index.image_path(0).is_file()
    # The same embeddings as the index `build` writes for the folder (same batches, same skipping).
    with pytest.warns(SkippedImagesWarning, match="broken.png"):
        built = GalleryIndex.build(setup["model"], setup["processor"], folder_with_a_bad_image, tmp_path / "index",
                                   batch_size=2, show_progress=False)
    assert built.paths == index.paths and built.skipped == index.skipped
    np.testing.assert_array_equal(np.asarray(built.embeddings), index.embeddings)


def test_pipeline_and_app_keep_the_readable_images_and_report_the_unreadable_one(setup, folder_with_a_bad_image):
    import app
    import decd.pipeline  # noqa: F401  (registers the task)
    from transformers import pipeline

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        search = pipeline("text-based-person-search", model=setup["model"], processor=setup["processor"],
                          gallery=str(folder_with_a_bad_image))
    assert "cam1/broken.png" in _one_skip_warning(record)
    assert [item["path"] for item in search.gallery_index.skipped] == ["cam1/broken.png"]

    gallery = app.load_gallery(setup["model"], setup["processor"], folder_with_a_bad_image, show_progress=False)
    assert [path.relative_to(folder_with_a_bad_image.resolve()).as_posix() for path in gallery.paths] \
        == search.gallery_index.paths
    assert len(gallery) == 5 and gallery.source == f"folder {folder_with_a_bad_image}"
    assert gallery.notes == ["1 unreadable image(s) were left out (not images, or damaged)"]
    np.testing.assert_array_equal(gallery.embeddings, search.gallery_index.embeddings)


def test_open_gallery_encodes_a_list_of_images(setup):
    paths = [str(path) for path in sorted(setup["gallery"].iterdir())]
    index = open_gallery(setup["model"], setup["processor"], paths)
    assert index.paths == paths and index.path is None and index.skipped == []
    images = [Image.open(path).convert("RGB") for path in paths]
    in_memory = open_gallery(setup["model"], setup["processor"], images)
    assert in_memory.paths is None
    np.testing.assert_allclose(in_memory.embeddings, index.embeddings, atol=1e-6)


def test_open_gallery_refuses_an_index_built_by_another_model(setup, tmp_path):
    _build(setup, tmp_path / "index")
    other = DecdModel.from_pretrained(setup["model_dir"])
    other.visual_projection.weight.data.mul_(2)  # retrained: another checksum
    with pytest.raises(StaleIndexError, match="rebuild the index"):
        open_gallery(other, setup["processor"], tmp_path / "index")
    with pytest.raises(StaleIndexError, match="rebuild the index"):
        open_gallery(other, setup["processor"], GalleryIndex.load(tmp_path / "index"))
    assert len(open_gallery(other, setup["processor"], tmp_path / "index", verify=False)) == 5


def test_open_gallery_errors_are_one_line_naming_the_path(setup, tmp_path):
    model, processor = setup["model"], setup["processor"]
    cases = [(tmp_path / "missing", IndexNotFoundError, "'.*missing' does not exist"),
             (tmp_path / "empty", GalleryIndexError, "no images found under '.*empty'"),
             (tmp_path / "file.png", GalleryIndexError, "'.*file.png' is a file"),
             (tmp_path / "only-bad", GalleryIndexError, "none of the 1 image files under '.*only-bad' could be read"),
             (tmp_path / "unfinished", IndexNotFoundError, "'.*unfinished' has no meta.json: an unfinished build")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.png").write_bytes(BAD)
    (tmp_path / "only-bad").mkdir()
    (tmp_path / "only-bad" / "a.jpg").write_bytes(BAD)
    (tmp_path / "unfinished" / "partial").mkdir(parents=True)
    for source, kind, message in cases:
        with pytest.raises(kind, match=message) as error:
            open_gallery(model, processor, source)
        assert "\n" not in str(error.value)
    with pytest.raises(IndexNotFoundError, match="has no meta.json: not a gallery index"):
        open_gallery(None, None, setup["gallery"])  # without a model only an index can be opened
    with pytest.raises(TypeError, match="not int"):
        open_gallery(model, processor, 3)


def test_a_folder_whose_image_links_to_a_file_outside_it_is_refused_naming_the_link(setup, tmp_path):
    """The folder listing keeps to the rule of every gallery path (`path_problem`): an image that is a symbolic link
    to a file outside the folder stops the open and the build, naming it, before anything is encoded; a link inside
    the folder is an image like any other."""
    model, processor = setup["model"], setup["processor"]
    gallery, outside = tmp_path / "crops", tmp_path / "elsewhere"
    gallery.mkdir()
    outside.mkdir()
    for image in sorted(setup["gallery"].iterdir()):
        (gallery / image.name).write_bytes(image.read_bytes())
    (outside / "private.png").write_bytes((gallery / "0.png").read_bytes())
    os.symlink(gallery / "0.png", gallery / "same.png")  # inside: listed and encoded
    assert "same.png" in open_gallery(model, processor, gallery).paths
    os.symlink(outside / "private.png", gallery / "link.png")
    message = r"the gallery folder '.*crops': entry \d \('link.png'\) leads through a symbolic link to " \
              r".*elsewhere/private.png, outside the gallery folder .*; a gallery is the image files inside its folder"
    with pytest.raises(GalleryIndexError, match=message):
        open_gallery(model, processor, gallery)
    with pytest.raises(GalleryIndexError, match=message):
        GalleryIndex.build(model, processor, gallery, tmp_path / "index", show_progress=False)
    assert not any((tmp_path / "index").iterdir())  # refused before anything was written


def test_a_gallery_of_one_s_own_is_opened_as_it_is_and_searched_through_the_protocol(setup, tmp_path):
    model, processor = setup["model"], setup["processor"]
    index = _build(setup, tmp_path / "index")
    assert isinstance(index, Gallery) and isinstance(open_gallery(model, processor, tmp_path / "index"), Gallery)
    assert not isinstance(np.zeros(3), Gallery)

    class Wrapped(Gallery):  # what the protocol asks for; the model record and text search come with it
        meta, skipped, backend, embedding_dim, filter_fields = index.meta, [], "exact", index.embedding_dim, {}

        def __len__(self):
            return len(index)

        def image_path(self, row):
            return index.image_path(row)

        def search(self, queries, top_k=10, *, filter=None, **options):
            return index.search(queries, top_k, filter=filter, **options)

    wrapped = Wrapped()
    assert open_gallery(model, processor, wrapped) is wrapped  # checked against the model: the same checksum
    assert wrapped.model_checksum == index.model_checksum and wrapped.gallery_dir == index.gallery_dir
    found, expected = wrapped.search_text(model, processor, "a person"), index.search_text(model, processor, "a person")
    assert found.paths == expected.paths and np.array_equal(found.scores, expected.scores)
    with pytest.raises(GalleryIndexError, match="needs a gallery in Milvus"):  # a local index has nothing to filter
        wrapped.search(np.ones(index.embedding_dim, np.float32), filter='camera == "c1"')
