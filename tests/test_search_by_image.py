"""Search by photo (re-identification) in GalleryIndex, `decd-search query --image` and the pipeline,
and the one score wording (`describe_match`) they share with the app."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import decd.pipeline  # noqa: F401  (registers the task)
from decd.cli import main
from decd.search import SCORE_EXPLANATION, GalleryIndex, StaleIndexError, describe_match, top_percent
from decd.synthetic import generate_synthetic_person_search
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .helpers import save_tiny_model


def _make_model(folder: Path, seed: int) -> Path:
    return save_tiny_model(folder, seed)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("by-image")
    model_dir, other_dir = _make_model(root / "model", 0), _make_model(root / "other", 1)
    gallery = generate_synthetic_person_search(root / "synthetic", num_train_ids=1, num_val_ids=1, num_test_ids=2,
                                               images_per_id=3, progress=False) / "imgs"
    model = DecdModel.from_pretrained(model_dir).eval()
    processor = DecdProcessor.from_pretrained(model_dir)
    index = GalleryIndex.build(model, processor, gallery, root / "index", batch_size=4, show_progress=False)
    return dict(root=root, model_dir=model_dir, other_dir=other_dir, gallery=gallery, model=model,
                processor=processor, index=index)


def _direct(model, processor, gallery, paths, query):
    with torch.no_grad():
        pixels = processor(images=[Image.open(gallery / path).convert("RGB") for path in paths],
                           return_tensors="pt")["pixel_values"]
        keys = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        one = processor(images=[Image.open(query).convert("RGB")], return_tensors="pt")["pixel_values"]
        query = F.normalize(model.get_image_features(pixel_values=one).pooler_output, dim=-1)
    scores = (query @ keys.T)[0]
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return [paths[i] for i in order], [float(scores[i]) for i in order]


def test_describe_match_is_rank_share_and_cosine():
    assert top_percent(1, 400) == pytest.approx(0.25) and top_percent(10, 10) == 100
    match = describe_match(1, 0.28412, 400)
    assert match == dict(rank=1, score=0.28412, top_percent=pytest.approx(0.25), label="#1 · 0.284 · top 0.25% of 400")
    assert describe_match(3, -0.1, 9)["label"] == "#3 · -0.100 · top 33.3% of 9"
    assert "cosine" in SCORE_EXPLANATION and "top p%" in SCORE_EXPLANATION
    with pytest.raises(ValueError):
        top_percent(0, 5)


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


def test_cli_query_by_image_prints_ranking_and_explanation(setup, capsys, tmp_path):
    index_dir, gallery = setup["root"] / "index", setup["gallery"]
    query = gallery / setup["index"].paths[2]
    grid = tmp_path / "grid.png"
    assert main(["query", str(index_dir), "--image", str(query), "--top_k", "3", "--grid", str(grid)]) == 0
    output = capsys.readouterr().out
    rows = [line.split() for line in output.splitlines() if line.split() and line.split()[0].isdigit()]
    expected = setup["index"].search_image(setup["model"], setup["processor"], query, top_k=3)
    assert [row[3] for row in rows] == expected.paths[0]
    assert rows[0][2] == f"{100 / len(setup['index']):.3g}%"
    assert f"photo {query}" in output and SCORE_EXPLANATION in output and grid.is_file()
    # a description and a photo in one call: one table each
    assert main(["query", str(index_dir), "a man in a red shirt", "--image", str(query), "--top_k", "2"]) == 0
    assert capsys.readouterr().out.count("Query:") == 2


@pytest.mark.parametrize("arguments, message", [
    ([], "give a description"),
    (["--image", "{missing}"], "does not exist"),
    (["--image", "{query}", "--model", "{other}"], "rebuild the index"),
])
def test_cli_query_by_image_user_errors(setup, capsys, tmp_path, arguments, message):
    paths = dict(missing=tmp_path / "missing.png", other=setup["other_dir"],
                 query=setup["gallery"] / setup["index"].paths[0])
    code = main(["query", str(setup["root"] / "index")] + [argument.format(**paths) for argument in arguments])
    captured = capsys.readouterr()
    assert code == 1 and message in captured.err and "Traceback" not in captured.err


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
