"""Tests of decd.visualize (retrieval grids, training curves) and of examples/evaluate.py."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from decd.visualize import (
    CORRECT_COLOR,
    WRONG_COLOR,
    grid_layout,
    plot_training_curves,
    rank_gallery,
    retrieval_grid,
    retrieval_grid_from_similarity,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EVALUATE_SCRIPT = REPO_ROOT / "examples" / "evaluate.py"


def _is_green(pixel):
    red, green, blue = pixel[:3]
    return green > 130 and red < 80 and blue < 120


def _is_red(pixel):
    red, green, blue = pixel[:3]
    return red > 170 and green < 80 and blue < 80


def _frame_pixels(image, layout, row, column):
    """Pixels in the middle of the left and top edges of the frame of (row, column)."""
    left, top, right, bottom = layout.frame_box(row, column)
    middle = layout.frame // 2
    return [image.getpixel((left + middle, (top + bottom) // 2)), image.getpixel(((left + right) // 2, top + middle))]


def _solid_gallery(tmp_path, count, size=(40, 100)):
    """Gallery images on disk, one solid colour each (blue shades, never pure red/green)."""
    paths = []
    for index in range(count):
        path = tmp_path / f"g{index}.png"
        Image.new("RGB", size, (20, 40, 120 + 10 * index)).save(path)
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------------------------------------
# retrieval_grid
# ---------------------------------------------------------------------------------------------


def test_grid_size_and_frame_colours(tmp_path):
    gallery = _solid_gallery(tmp_path, 5)
    gallery[1] = Image.new("RGB", (30, 90), (20, 40, 200))  # PIL images and paths may be mixed
    ranked = [[0, 1, 2], [4, 3, 2]]
    correct = [[True, False, True], [False, False, True]]
    long_caption = "A woman wearing a long blue coat over a white shirt, black trousers and white shoes " * 6
    output = retrieval_grid(["a man in red", long_caption], gallery, ranked, correct, tmp_path / "out" / "grid.png",
                            top_k=3, tile_size=(128, 64), title="test grid", scores=[[0.9, 0.5, 0.1]] * 2)
    assert output == tmp_path / "out" / "grid.png" and output.is_file()

    image = Image.open(output).convert("RGB")
    layout = grid_layout(2, 3, (128, 64))
    cell_width = 64 + 2 * layout.frame
    expected_width = 2 * layout.margin + layout.caption_width + layout.gap + 3 * cell_width + 2 * layout.gap
    expected_height = (2 * layout.margin + layout.header_height + 2 * (128 + 2 * layout.frame + layout.label_height)
                       + layout.row_gap)
    assert image.size == (layout.width, layout.height) == (expected_width, expected_height)
    assert layout.frame >= 3

    for row, flags in enumerate(correct):
        for column, flag in enumerate(flags):
            for pixel in _frame_pixels(image, layout, row, column):
                assert (_is_green if flag else _is_red)(pixel), (row, column, pixel)
    # The crop is inside the frame: the centre of a tile shows the gallery image, not a frame colour.
    left, top, right, bottom = layout.tile_box(0, 0)
    assert image.getpixel(((left + right) // 2, (top + bottom) // 2)) == (20, 40, 120)
    assert CORRECT_COLOR != WRONG_COLOR


def test_grid_more_columns_and_rows_scale_the_image(tmp_path):
    gallery = _solid_gallery(tmp_path, 12)
    ranked = [list(range(12))] * 3
    correct = [[index % 2 == 0 for index in range(12)]] * 3
    output = retrieval_grid(["q1", "q2", "q3"], gallery, ranked, correct, tmp_path / "grid.png", top_k=10,
                            tile_size=(96, 48))
    layout = grid_layout(3, 10, (96, 48))
    with Image.open(output) as image:
        assert image.size == (layout.width, layout.height)
    small = retrieval_grid(["q1"], gallery, [[0, 1]], [[True, False]], tmp_path / "small.png", top_k=10)
    with Image.open(small) as image:  # fewer results than top_k: only the available columns
        assert image.size == (grid_layout(1, 2).width, grid_layout(1, 2).height)


def test_grid_draws_an_unfilled_place_empty(tmp_path):
    """-1 (an approximate search found nothing for that place) is an empty frame, never gallery[-1]."""
    gallery = [Image.new("RGB", (30, 90), (20, 40, 200)), Image.new("RGB", (30, 90), (200, 40, 20))]
    output = retrieval_grid(["q"], gallery, [[0, -1]], None, tmp_path / "grid.png", top_k=2, scores=[[0.5, -np.inf]])
    image = Image.open(output).convert("RGB")
    layout = grid_layout(1, 2)
    centre = lambda box: ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)  # noqa: E731
    assert image.getpixel(centre(layout.tile_box(0, 0))) == (20, 40, 200)
    assert image.getpixel(centre(layout.tile_box(0, 1))) == (255, 255, 255)


def test_grid_rejects_inconsistent_inputs(tmp_path):
    with pytest.raises(ValueError, match="one entry per query"):
        retrieval_grid(["a", "b"], _solid_gallery(tmp_path, 2), [[0, 1]], [[True, False]], tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one query"):
        retrieval_grid([], [], [], [], tmp_path / "x.png")


def test_rank_gallery_is_descending_with_ties_by_index():
    similarity = torch.tensor([[0.1, 0.5, 0.5, 0.9, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert rank_gallery(similarity).tolist() == [[3, 1, 2, 4, 0], [0, 1, 2, 3, 4]]


def test_grid_from_similarity_derives_ranking_and_correctness(tmp_path):
    paths = _solid_gallery(tmp_path, 4)
    gallery = {"image_path": paths, "person_id": [7, 7, 8, 9]}
    queries = {"caption": ["first", "second", "third"], "person_id": [8, 7, 9]}
    similarity = torch.tensor([
        [0.0, 0.0, 0.0, 0.0],
        [0.2, 0.9, 0.2, 0.1],  # ranks 1, 0, 2, 3 (tie 0/2 by index): correct, correct, wrong, wrong
        [0.3, 0.3, 0.9, 0.3],
    ])
    output = retrieval_grid_from_similarity(similarity, queries, gallery, [1, 0], tmp_path / "g.png", top_k=3)
    image = Image.open(output).convert("RGB")
    layout = grid_layout(2, 3)
    assert image.size == (layout.width, layout.height)
    expected = [[True, True, False], [False, False, True]]  # query 1 (id 7), then query 0 (id 8; all ties)
    for row, flags in enumerate(expected):
        for column, flag in enumerate(flags):
            assert all((_is_green if flag else _is_red)(p) for p in _frame_pixels(image, layout, row, column))
    with pytest.raises(ValueError, match="out of range"):
        retrieval_grid_from_similarity(similarity, queries, gallery, [5], tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------
# plot_training_curves
# ---------------------------------------------------------------------------------------------


def _log_history():
    history = []
    for step in range(10, 201, 10):
        history.append({"epoch": step / 100, "step": step, "loss": 5.0 / (1 + step / 50), "loss_sew": 3.0 / (1 + step / 50),
                        "loss_mcm": 1.5 - step / 400, "learning_rate": 1e-5, "grad_norm": 3.0})
        if step % 50 == 0:
            history.append({"epoch": step / 100, "step": step, "eval_R1": 20 + step / 10, "eval_R5": 40 + step / 10,
                            "eval_mAP": 15 + step / 12, "eval_num_queries": 40})
    history.append({"step": 200, "train_loss": 2.0, "train_runtime": 10.0})
    return history


def test_plot_training_curves_writes_a_png(tmp_path):
    output = plot_training_curves(_log_history(), tmp_path / "plots" / "curves.png", title="run")
    assert output.is_file() and output.stat().st_size > 5000
    image = Image.open(output).convert("RGB")
    assert image.width > 800 and image.height > 300
    colors = {color for _, color in image.getcolors(maxcolors=1 << 20)}
    assert len(colors) > 20  # text, grid, several coloured series
    # The curves are drawn in distinct colours in both halves of the picture.
    left = image.crop((0, 0, image.width // 2, image.height))
    right = image.crop((image.width // 2, 0, image.width, image.height))
    for half in (left, right):
        array = np.asarray(half).astype(int)
        saturated = (array.max(axis=2) - array.min(axis=2)) > 100
        assert saturated.sum() > 200


def test_plot_training_curves_single_points_and_missing_keys(tmp_path):
    output = plot_training_curves([{"step": 3, "loss": 1.0}], tmp_path / "one.png")
    assert output.is_file()
    output = plot_training_curves({"log_history": [{"step": 3, "eval_R1": 50.0}]}, tmp_path / "state.png")
    assert output.is_file()


@pytest.mark.parametrize("history", [[], [{"loss": 1.0}], [{"step": 1, "learning_rate": 0.1}]])
def test_plot_training_curves_raises_without_data(tmp_path, history):
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_training_curves(history, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------------------------------------
# examples/evaluate.py
# ---------------------------------------------------------------------------------------------


