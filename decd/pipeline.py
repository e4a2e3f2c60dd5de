"""A transformers pipeline for text-based person search: `pipeline("text-based-person-search", ...)`.

Importing this module registers the task with `transformers.pipelines.PIPELINE_REGISTRY`:

    import decd.pipeline  # registers "text-based-person-search"
    from transformers import pipeline

    search = pipeline("text-based-person-search", model="path/to/decd-model", gallery="path/to/index")
    search("a woman in a red coat", top_k=5)
    # [{"index": 17, "path": "cam2/0042.png", "score": 0.61, "rank": 1, "top_percent": 0.25,
    #   "label": "#1 · 0.610 · top 0.25% of 400"}, ...] best first
    search(Image.open("query_crop.png"))       # search by photo: image-image similarity (re-identification)
    search({"image": "query_crop.png"})        # the same from a path

`gallery` is an index folder written by `GalleryIndex.build` / `decd-search index` (the model must be
the one that built it, else `StaleIndexError`), a folder of images (encoded in memory when the
pipeline is created, unreadable images left out with a warning; build an index for anything large), a
list of image paths and/or PIL images, a `GalleryIndex`, or a Milvus collection: `gallery="gallery.db/crops"`
(Milvus Lite) or `gallery="http://host:19530/crops"` (a server; `gallery_collection=` names the collection
when the URI does not, `gallery_token=` for a server that needs one): whatever
`decd.search.open_gallery` opens. A list of queries gives a list of result lists. A Milvus gallery also
takes `filter='camera == "c12" and timestamp >= 1700000000'` per call (a Milvus boolean expression).

A query is a description (str), a photo of the person (a PIL image, or `{"image": path / PIL / bytes}`:
opened by the processor's `load_image` and encoded by `embed_images`, like the gallery), or
`{"text": description}`. A str is always a description; pass a path as `{"image": path}`. Scores are
cosine similarities, described by `decd.search.describe_match` / `SCORE_EXPLANATION` (the same wording
as the app and `decd-search query`).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from inference_decd import embed_images, embed_texts

from .search import check_top_k, describe_matches, filter_options, open_gallery
from .search.backends import DEFAULT_CHUNK_SIZE

TASK = "text-based-person-search"


class TextBasedPersonSearchPipeline(Pipeline):
    """Rank a gallery of pedestrian crops for a text description (cosine similarity of DECD embeddings).

    Args (in addition to `Pipeline`'s):
        gallery: index folder, image folder, list of image paths / PIL images, a `GalleryIndex`, or a Milvus
            store / collection (`gallery.db/crops`, `http://host:19530/crops`).
        gallery_batch_size: images per forward pass when the gallery has to be encoded (default 64).
        gallery_collection, gallery_token: the Milvus collection (when the URI names none) and a token.

    Call arguments:
        top_k: results per description (default 10, clamped to the gallery size).
        backend: default the one the index was built with (exact, or its FAISS index); "exact" forces
            the exact search (see `GalleryIndex.search`).
        chunk_size: gallery rows scored at once by the exact backend.
        filter: a Milvus gallery: a boolean expression over its fields; only matching images are ranked.

    Returns, per query (a description, or a photo: PIL image or `{"image": ...}`): a list of
    `{"index": gallery row, "score": cosine similarity, "rank", "top_percent", "label", "path": path}`
    dictionaries, best first (`path` only when the gallery has paths; relative to the gallery folder
    for an index, as given for a list; `rank`, `top_percent` and `label` from `describe_match`).
    """

    # DecdProcessor joins the tokenizer and image processor; the pipeline needs both (text queries,
    # and images when the gallery is encoded here).
    _load_processor = None
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, *args, gallery: Any = None, gallery_batch_size: int = 64, gallery_collection: str | None = None,
                 gallery_token: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            self.processor = self._default_processor()
        if gallery is None:
            raise ValueError(
                f'the {TASK!r} pipeline needs a gallery: pipeline("{TASK}", model=..., gallery=INDEX_DIR or a list '
                "of images)"
            )
        # An index is checked against the model once here (not on every call); a folder's unreadable images
        # are left out with one warning and listed in `.gallery_index.skipped`.
        self.gallery_index = open_gallery(self.model, self.processor, gallery, batch_size=gallery_batch_size,
                                          collection=gallery_collection, token=gallery_token)

    def _default_processor(self):
        from inference_decd import load_processor

        name = getattr(self.model, "name_or_path", "") or ""
        if not name:
            raise ValueError("the model has no name_or_path to load its DecdProcessor from; pass processor=...")
        return load_processor(name, self.model)

    def _sanitize_parameters(self, top_k=None, backend=None, chunk_size=None, filter=None, **unused):
        if unused:
            raise TypeError(f"unexpected argument(s) for the {TASK!r} pipeline: {', '.join(sorted(unused))}")
        postprocess = {"backend": backend} if backend is not None else {}
        for name, value in (("top_k", top_k), ("chunk_size", chunk_size)):
            if value is not None:
                postprocess[name] = check_top_k(value, name)  # positive whole numbers, named otherwise
        # Checked here, once per call, so that a gallery that cannot filter fails before anything is encoded.
        if not hasattr(self, "gallery_index"):  # called by Pipeline.__init__, before the gallery is opened
            return {}, {}, dict(postprocess, **({"filter": filter} if filter else {}))
        return {}, {}, dict(postprocess, **filter_options(self.gallery_index, filter))

    def __call__(self, queries, *args, **kwargs):
        if isinstance(queries, (list, tuple)) and not queries:  # no query, no result (checked like any call)
            self._sanitize_parameters(**kwargs)
            return []
        return super().__call__(queries, *args, **kwargs)

    def preprocess(self, query: Any) -> dict:
        if isinstance(query, dict):
            if set(query) == {"image"}:
                return {"image": query["image"]}
            if set(query) == {"text"}:
                query = query["text"]
            else:
                raise ValueError(f'a query dict must be {{"image": ...}} or {{"text": ...}}, got keys {sorted(query)}')
        elif not isinstance(query, str):
            import PIL.Image

            if isinstance(query, PIL.Image.Image):
                return {"image": query}
            raise ValueError(f"a query must be a description (str), a PIL image or {{\"image\": path}}, "
                             f"got {type(query).__name__}")
        if not isinstance(query, str):
            raise ValueError(f"a description must be a string, got {type(query).__name__}")
        if not query.strip():
            raise ValueError("the description is empty: say what the person looks like")
        return {"description": query}

    def _forward(self, model_inputs: dict) -> dict:
        if "image" in model_inputs:  # opened by the processor's load_image, encoded like the gallery
            return {"image_embeds": embed_images(self.model, self.processor, [model_inputs["image"]], batch_size=1,
                                                 show_progress=False)}
        return {"text_embeds": embed_texts(self.model, self.processor, [model_inputs["description"]])}

    def postprocess(self, model_outputs: dict, top_k: int = 10, backend: str | None = None,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, **search_options) -> list[dict]:
        query = model_outputs["text_embeds"] if "text_embeds" in model_outputs else model_outputs["image_embeds"]
        result = self.gallery_index.search(query, top_k=top_k, backend=backend, chunk_size=chunk_size,
                                           **search_options)
        return describe_matches(result)


if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=TextBasedPersonSearchPipeline, pt_model=AutoModel, type="multimodal"
    )

__all__ = ["TASK", "TextBasedPersonSearchPipeline"]
