"""Pictures for inspecting a DECD model, drawn with matplotlib: retrieval grids and training curves.

- `retrieval_grid`: one row per text query, its caption on the left and the top-k retrieved gallery
  crops in rank order, each framed green (same identity as the query) or red (another identity).
- `retrieval_grid_from_similarity`: the same from a `[num_queries, num_gallery]` similarity matrix
  and the evaluation `queries` / `gallery` of `load_person_search` (ranking and correctness derived).
- `plot_training_curves`: training losses and evaluation metrics over steps, from a Hugging Face
  `Trainer.state.log_history` (also `trainer_state.json["log_history"]`).

"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.patches import Patch
from PIL import Image, ImageOps

from image_loading_decd import load_image

__all__ = [
    "CORRECT_COLOR",
    "WRONG_COLOR",
    "NEUTRAL_COLOR",
    "GridLayout",
    "grid_layout",
    "retrieval_grid",
    "retrieval_grid_from_similarity",
    "rank_gallery",
    "plot_training_curves",
    "LOSS_KEYS",
    "EVAL_KEYS",
]

PathLike = Union[str, os.PathLike]

CORRECT_COLOR = (0, 170, 70)
WRONG_COLOR = (215, 35, 35)
NEUTRAL_COLOR = (120, 120, 120)  # frames when correctness is unknown (`correct=None`: an unlabeled gallery)
TEXT_COLOR = (25, 25, 25)
MUTED_TEXT = (110, 110, 110)
TILE_PAD_COLOR = (232, 232, 232)
SEPARATOR_COLOR = (215, 215, 215)

LOSS_KEYS = ("loss", "loss_sew", "loss_mcm", "loss_id")
EVAL_KEYS = ("eval_R1", "eval_R5", "eval_R10", "eval_mAP", "eval_mINP")
# Distinct, colour-blind friendly-ish (Okabe-Ito) colours, one per series.
SERIES_COLORS = {
    "loss": (0, 0, 0),
    "loss_sew": (0, 114, 178),
    "loss_mcm": (213, 94, 0),
    "loss_id": (0, 158, 115),
    "eval_R1": (0, 114, 178),
    "eval_R5": (230, 159, 0),
    "eval_R10": (0, 158, 115),
    "eval_mAP": (204, 121, 167),
    "eval_mINP": (213, 94, 0),
}


# --------------------------------------------------------------------------------------------
# Retrieval grid
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a retrieval grid (all sizes in pixels, boxes are (left, top, right, bottom)).

    The image is `margin | caption column | gap | k cells separated by gap | margin` wide and
    `margin | header | rows separated by row_gap | margin` high. A cell is the tile framed by
    `frame` pixels on each side, with a `label_height` band under the frame for the rank / score.
    """

    num_rows: int
    num_columns: int
    tile_size: tuple[int, int]  # (height, width)
    margin: int = 10
    header_height: int = 30
    caption_width: int = 260
    gap: int = 6
    row_gap: int = 10
    frame: int = 4
    label_height: int = 16

    @property
    def cell_width(self) -> int:
        return self.tile_size[1] + 2 * self.frame

    @property
    def row_height(self) -> int:
        return self.tile_size[0] + 2 * self.frame + self.label_height

    @property
    def width(self) -> int:
        cells = self.num_columns * self.cell_width + max(self.num_columns - 1, 0) * self.gap
        return 2 * self.margin + self.caption_width + self.gap + cells

    @property
    def height(self) -> int:
        rows = self.num_rows * self.row_height + max(self.num_rows - 1, 0) * self.row_gap
        return 2 * self.margin + self.header_height + rows

    def row_top(self, row: int) -> int:
        return self.margin + self.header_height + row * (self.row_height + self.row_gap)

    def frame_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """The outer box of the coloured frame of (row, column); the tile sits `frame` px inside."""
        left = self.margin + self.caption_width + self.gap + column * (self.cell_width + self.gap)
        top = self.row_top(row)
        return left, top, left + self.cell_width, top + self.tile_size[0] + 2 * self.frame

    def tile_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        left, top, right, bottom = self.frame_box(row, column)
        return left + self.frame, top + self.frame, right - self.frame, bottom - self.frame

    def caption_box(self, row: int) -> tuple[int, int, int, int]:
        top = self.row_top(row)
        return self.margin, top, self.margin + self.caption_width - 8, top + self.row_height


def grid_layout(num_rows: int, num_columns: int, tile_size: tuple[int, int] = (128, 64)) -> GridLayout:
    """The layout `retrieval_grid` uses for `num_rows` queries and `num_columns` ranks."""
    return GridLayout(num_rows=num_rows, num_columns=num_columns, tile_size=(int(tile_size[0]), int(tile_size[1])))


def _load_tile(image: Any, tile_size: tuple[int, int]) -> Image.Image:
    """A gallery image (anything `load_image` opens) letterboxed into a (height, width) tile, aspect kept."""
    height, width = tile_size
    picture = load_image(image, size=(2 * height, 2 * width))  # the pixels every entry point sees
    return ImageOps.pad(picture, (width, height), method=Image.Resampling.BICUBIC, color=TILE_PAD_COLOR)


def retrieval_grid(
    query_captions: Sequence[str],
    gallery_images: Sequence[Any],
    ranked_indices: Sequence[Sequence[int]],
    correct: Optional[Sequence[Sequence[bool]]],
    output_path: PathLike,
    top_k: int = 10,
    tile_size: tuple[int, int] = (128, 64),
    title: Optional[str] = None,
    scores: Optional[Sequence[Sequence[float]]] = None,
    query_labels: Optional[Sequence[str]] = None,
) -> Path:
    """Draw the top-k retrieval results of some text queries and save them as a PNG.

    Args:
        query_captions: one caption per query (row); long captions are wrapped, and truncated with
            "..." when they do not fit the row.
        gallery_images: the gallery, indexable by gallery index; items are PIL images or file paths
            (only the shown ones are opened).
        ranked_indices: per query, gallery indices in rank order (best first); the first `top_k` are shown.
            A negative index is a place an approximate search could not fill: an empty grey frame, marked "-".
        correct: per query, per rank, whether that result has the query's identity: framed in
            `CORRECT_COLOR` (green) if so, `WRONG_COLOR` (red) otherwise. None when identities are
            unknown (an unlabeled gallery): every frame is `NEUTRAL_COLOR` (grey) and there is no legend.
        output_path: where to write the PNG (parent folders are created).
        top_k: results shown per query. The grid has `min(top_k, longest ranking)` columns.
        tile_size: (height, width) of each gallery crop; images are letterboxed, aspect kept.
        title: optional title drawn in the header.
        scores: optional per query, per rank similarity, printed under the rank number.
        query_labels: optional short label per query (e.g. "query 12 - id 7") drawn above its caption.

    Returns:
        The path of the written PNG (drawn with matplotlib). Its size is `grid_layout(rows, columns,
        tile_size)`'s (width, height), and the frame of (row, column) is at `layout.frame_box(row, column)`.
    """
    num_rows = len(query_captions)
    if num_rows == 0:
        raise ValueError("retrieval_grid needs at least one query")
    labeled = correct is not None
    if not labeled:
        correct = [[False] * len(ranks) for ranks in ranked_indices]
    if len(ranked_indices) != num_rows or len(correct) != num_rows:
        raise ValueError(
            f"query_captions, ranked_indices and correct must have one entry per query; got "
            f"{num_rows}, {len(ranked_indices)} and {len(correct)}"
        )
    for name, values in (("scores", scores), ("query_labels", query_labels)):
        if values is not None and len(values) != num_rows:
            raise ValueError(f"{name} must have one entry per query ({num_rows}); got {len(values)}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    for row, (ranks, flags) in enumerate(zip(ranked_indices, correct)):
        if len(flags) < min(top_k, len(ranks)):
            raise ValueError(f"correct[{row}] has {len(flags)} entries, fewer than the {min(top_k, len(ranks))} shown ranks")
    num_columns = max(1, min(top_k, max(len(ranks) for ranks in ranked_indices)))
    layout = grid_layout(num_rows, num_columns, tile_size)

    figure, place = _pixel_figure(layout.width, layout.height)
    header_y = layout.margin + layout.header_height // 2 - 2
    if title:
        place.text(layout.margin, header_y, title, fontsize=11, va="center")
    if labeled:
        handles = [Patch(facecolor="none", edgecolor=_rgb(color), linewidth=2, label=label)
                   for color, label in ((CORRECT_COLOR, "same identity"), (WRONG_COLOR, "other identity"))]
        figure.legend(handles=handles, loc="upper right", ncols=2, frameon=False, fontsize=8,
                      bbox_to_anchor=(1 - layout.margin / layout.width, 1 - layout.margin / layout.height))
    place.line(layout.margin + layout.header_height - 6, layout.margin, layout.width - layout.margin)

    characters = max(8, int((layout.caption_width - 8) / 6.2))  # an 8-point font averages ~6 px a character
    tile_cache: dict[int, np.ndarray] = {}
    for row in range(num_rows):
        left, top, _, bottom = layout.caption_box(row)
        label_lines = textwrap.wrap(query_labels[row], characters)[:2] if query_labels is not None else []
        room = max(0, (bottom - top - 15 * len(label_lines) - 6) // 15)
        caption_lines = textwrap.wrap(query_captions[row], characters)
        if len(caption_lines) > room:  # too long for the row: cut, and say so
            caption_lines = caption_lines[:room]
            if caption_lines:
                caption_lines[-1] = caption_lines[-1][: characters - 4].rstrip() + " ..."
        text = "\n".join(caption_lines)
        if label_lines:
            place.text(left, top + 2, "\n".join(label_lines), fontsize=8, color=_rgb(MUTED_TEXT), va="top")
        place.text(left, top + 6 + 15 * len(label_lines), text, fontsize=8, va="top", linespacing=1.3)

        for column, gallery_index in enumerate(list(ranked_indices[row])[:num_columns]):
            gallery_index = int(gallery_index)
            frame = layout.frame_box(row, column)
            if gallery_index < 0:  # a place an approximate search could not fill: an empty frame, no image
                place.rectangle(frame, NEUTRAL_COLOR)
                place.rectangle(layout.tile_box(row, column), (255, 255, 255))
                label = f"#{column + 1}  -"
            else:
                if gallery_index not in tile_cache:
                    tile_cache[gallery_index] = np.asarray(_load_tile(gallery_images[gallery_index], layout.tile_size))
                color = NEUTRAL_COLOR if not labeled else CORRECT_COLOR if bool(correct[row][column]) else WRONG_COLOR
                place.rectangle(frame, color)
                place.image(layout.tile_box(row, column), tile_cache[gallery_index])
                label = f"#{column + 1}" + (f"  {float(scores[row][column]):.3f}" if scores is not None else "")
            frame_left, _, frame_right, frame_bottom = frame
            place.text((frame_left + frame_right) / 2, frame_bottom + 2, label, fontsize=7.5, ha="center", va="top")
        if row < num_rows - 1:
            place.line(layout.row_top(row) + layout.row_height + layout.row_gap // 2, layout.margin,
                       layout.width - layout.margin)

    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_path, format="png", dpi=100, facecolor="white")
    return output_path


def _rgb(color: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(channel / 255 for channel in color)


class _PixelPlacer:
    """Draws on a matplotlib figure in pixel coordinates from the top-left corner (as `GridLayout` measures)."""

    def __init__(self, figure, width: int, height: int):
        self.figure, self.width, self.height = figure, width, height

    def _x(self, x):
        return x / self.width

    def _y(self, y):
        return 1 - y / self.height

    def text(self, x, y, text, **kwargs):
        self.figure.text(self._x(x), self._y(y), text, color=kwargs.pop("color", _rgb(TEXT_COLOR)), **kwargs)

    def line(self, y, left, right):
        from matplotlib.lines import Line2D

        self.figure.add_artist(Line2D([self._x(left), self._x(right)], [self._y(y)] * 2, linewidth=0.8,
                                      color=_rgb(SEPARATOR_COLOR)))

    def rectangle(self, box, color):
        from matplotlib.patches import Rectangle

        left, top, right, bottom = box
        self.figure.add_artist(Rectangle((self._x(left), self._y(bottom)), (right - left) / self.width,
                                         (bottom - top) / self.height, facecolor=_rgb(color), edgecolor="none",
                                         antialiased=False, zorder=-1))

    def image(self, box, pixels):
        left, top, right, bottom = box
        axes = self.figure.add_axes((self._x(left), self._y(bottom), (right - left) / self.width,
                                     (bottom - top) / self.height))
        axes.imshow(pixels, interpolation="nearest", aspect="auto")
        axes.set_axis_off()


def _pixel_figure(width: int, height: int, **kwargs):
    """A matplotlib figure of exactly width x height pixels (at 100 dpi; `kwargs` go to `Figure`) and a placer
    in pixel coordinates."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only: no display needed
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width / 100, height / 100), dpi=100, facecolor="white", **kwargs)
    return figure, _PixelPlacer(figure, width, height)


def _as_numpy(similarity: Any) -> np.ndarray:
    if hasattr(similarity, "detach"):  # torch tensor
        similarity = similarity.detach().float().cpu().numpy()
    array = np.asarray(similarity, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"similarity must be a [num_queries, num_gallery] matrix, got shape {array.shape}")
    return array


def rank_gallery(similarity_rows: Any) -> np.ndarray:
    """Gallery indices per row by descending score, equal scores by lower gallery index first (stable sort)."""
    return np.argsort(-_as_numpy(similarity_rows), axis=1, kind="stable")


def retrieval_grid_from_similarity(
    similarity: Any,
    queries: Any,
    gallery: Any,
    query_indices: Iterable[int],
    output_path: PathLike,
    top_k: int = 10,
    tile_size: tuple[int, int] = (128, 64),
    title: Optional[str] = None,
    show_scores: bool = True,
) -> Path:
    """`retrieval_grid` for some queries of an evaluation, from its `[num_queries, num_gallery]` similarity.

    Only the selected rows are ranked (descending score, ties by lower gallery index, as in the
    metrics). A result is correct when its gallery `person_id` equals the query's. Captions come from
    `queries["caption"]`, images from `gallery["image_path"]` (opened lazily). `queries` / `gallery`
    are the "queries" / "gallery" of `load_person_search(..., split="val"|"test")` or dicts of lists.
    Each row's label gives the query index, its identity and the rank of its first correct result.
    """
    matrix = similarity
    query_indices = [int(index) for index in query_indices]
    if not query_indices:
        raise ValueError("query_indices is empty; pick at least one query")
    num_queries, num_gallery = (int(size) for size in matrix.shape)
    for index in query_indices:
        if not 0 <= index < num_queries:
            raise ValueError(f"query index {index} is out of range for {num_queries} queries")
    rows = _as_numpy(matrix[query_indices] if hasattr(matrix, "detach") else np.asarray(matrix)[query_indices])
    order = rank_gallery(rows)

    gallery_ids = np.asarray(list(gallery["person_id"]))
    image_paths = list(gallery["image_path"])
    if len(gallery_ids) != num_gallery or len(image_paths) != num_gallery:
        raise ValueError(
            f"similarity has {num_gallery} gallery columns but the gallery has {len(gallery_ids)} items"
        )
    query_ids = queries["person_id"]
    captions = queries["caption"]

    ranked, flags, shown_scores, captions_shown, labels = [], [], [], [], []
    for row, query_index in enumerate(query_indices):
        query_id = int(query_ids[query_index])
        matches = gallery_ids[order[row]] == query_id
        first = int(np.argmax(matches)) + 1 if matches.any() else None
        ranked.append(order[row, :top_k].tolist())
        flags.append(matches[:top_k].tolist())
        shown_scores.append(rows[row, order[row, :top_k]].tolist())
        captions_shown.append(str(captions[query_index]))
        match_text = f"first match at rank {first}" if first is not None else "no match in gallery"
        labels.append(f"query {query_index} - id {query_id} - {match_text}")
    return retrieval_grid(
        captions_shown, image_paths, ranked, flags, output_path, top_k=top_k, tile_size=tile_size, title=title,
        scores=shown_scores if show_scores else None, query_labels=labels,
    )


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


def _series(log_history: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """{key: [(step, value), ...]} for the keys present (finite numbers) in entries that have a `step`."""
    found: dict[str, list[tuple[float, float]]] = {}
    for entry in log_history:
        if not isinstance(entry, Mapping) or entry.get("step") is None:
            continue
        try:
            step = float(entry["step"])
        except (TypeError, ValueError):
            continue
        for key in keys:
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                continue
            if math.isfinite(float(value)) and math.isfinite(step):
                found.setdefault(key, []).append((step, float(value)))
    for points in found.values():
        points.sort(key=lambda point: point[0])
    return found


def plot_training_curves(
    log_history: Sequence[Mapping[str, Any]],
    output_path: PathLike,
    title: Optional[str] = None,
    panel_size: tuple[int, int] = (560, 380),
) -> Path:
    """Plot training losses (left) and evaluation metrics (right) over steps; save as a PNG.

    Args:
        log_history: `Trainer.state.log_history` (or `trainer_state.json["log_history"]`): a list of
            dicts; entries with a `step` contribute their `loss`, `loss_sew`, `loss_mcm`, `loss_id`
            (left panel) and `eval_R1`, `eval_R5`, `eval_R10`, `eval_mAP`, `eval_mINP` (right panel,
            percent). Missing keys are skipped; a panel with nothing says "no data logged".
        output_path: where to write the PNG (parent folders are created).
        title: optional title above both panels.
        panel_size: (width, height) of each panel in pixels (at 100 dpi).

    Raises:
        ValueError: when no entry has a step and any of those keys.
    """
    if isinstance(log_history, Mapping):  # a whole trainer_state.json dict
        log_history = log_history.get("log_history", [])
    losses = _series(log_history, LOSS_KEYS)
    metrics = _series(log_history, EVAL_KEYS)
    if not losses and not metrics:
        raise ValueError(
            f"nothing to plot: no log_history entry with a 'step' has any of {list(LOSS_KEYS + EVAL_KEYS)} "
            f"({len(log_history)} entries given)"
        )
    figure, _ = _pixel_figure(panel_size[0] * 2, panel_size[1], layout="constrained")
    for axes, series, heading, unit in zip(figure.subplots(1, 2), (losses, metrics),
                                          ("Training losses", "Evaluation metrics"), ("loss", "percent")):
        for key, points in series.items():
            steps, values = zip(*points)
            axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key,
                      color=_rgb(SERIES_COLORS.get(key, NEUTRAL_COLOR)))
        axes.set_title(heading)
        axes.set_xlabel("step")
        axes.set_ylabel(unit)
        axes.grid(alpha=0.3)
        if series:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "no data logged", ha="center", va="center", transform=axes.transAxes)
    if title:
        figure.suptitle(title)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_path, format="png")
    return output_path
