"""How a match is worded and shown: one wording for the app, `decd-search query`, the pipeline and the handler."""

from __future__ import annotations

import os
import unicodedata
from typing import Callable, Union

SCORE_EXPLANATION = ("score: cosine similarity of the query's and the image's DECD embeddings (-1 to 1, higher is "
                     "closer). Its scale depends on the query (one query's best match may score 0.3, another's 0.8), "
                     "so compare results of one query, not scores across queries. top p%: the image's rank among all "
                     "the gallery's images (top 1% of 400 = among the best 4), or, with a filter, among the images it "
                     "lets through.")
FILTER_CHARACTERS = 200  # a filter expression is shown cut after this many characters


def cut(text: str, limit: int, show: Callable[[str], str] = str) -> str:
    """`text` as `show` shows it, or its first `limit` characters followed by how long it is: one line stays short."""
    return show(text) if len(text) <= limit else f"{show(text[:limit])}... ({len(text):,} characters)"


def shown_filter(expression: str) -> str:
    """A filter expression as a message shows it: quoted (so on one line), cut after FILTER_CHARACTERS."""
    return cut(expression, FILTER_CHARACTERS, repr)


def printable(text: str) -> str:
    """`text` safe to print or log: control and formatting characters (ANSI escapes, newlines, carriage returns,
    bidirectional overrides, ...) shown as backslash escapes, so a file name or a caption can neither rewrite
    the terminal nor forge an extra line; everything else as it is."""
    return "".join(char if unicodedata.category(char) not in ("Cc", "Cf", "Zl", "Zp") or char == " "
                   else char.encode("unicode_escape").decode("ascii") for char in text)


def display_path(path: Union[str, os.PathLike]) -> str:
    """A path as text that can always be printed: bytes that are not UTF-8 (kept in `paths` as lone
    surrogates, Python's surrogateescape) are shown as backslash escapes, e.g. ``caf\\xe9.png``, and so are
    control characters (`printable`)."""
    return printable(os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))


def describe_status(status) -> str:
    """What a result's `file_status` means, for the terminal and the app ("" when the file is as indexed)."""
    return {"deleted": "file deleted since indexing", "changed": "file changed since indexing"}.get(status, "")


def check_top_k(top_k, name: str = "top_k") -> int:
    """`top_k` as an int: a positive whole number (an int, or a float such as a slider's 5.0), else ValueError naming
    the value and its type. One rule for the pipeline, the app, `GalleryIndex.search` and `decd-search`."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or not float(top_k).is_integer() \
            or top_k < 1:
        raise ValueError(f"{name} must be a positive whole number, got {top_k!r} ({type(top_k).__name__})")
    return int(top_k)


def top_percent(rank: int, gallery_size: int) -> float:
    """The share of the gallery (in percent) ranked at or above `rank` (1-based): 1 of 400 -> 0.25."""
    if gallery_size < 1 or rank < 1:
        raise ValueError(f"rank and gallery_size must be at least 1, got rank={rank}, gallery_size={gallery_size}")
    return 100.0 * rank / gallery_size


def describe_match(rank: int, score: float, gallery_size: int) -> dict:
    """A ranked result in readable form: `{"rank", "score", "top_percent", "label"}`.

    `label` is what the app's captions, `decd-search query` and the pipeline show:
    "#1 · 0.284 · top 0.25% of 400" (score = cosine similarity; see `SCORE_EXPLANATION`).
    """
    percent = top_percent(rank, gallery_size)
    return dict(rank=int(rank), score=float(score), top_percent=percent,
                label=f"#{int(rank)} · {float(score):.3f} · top {percent:.3g}% of {int(gallery_size)}")


def describe_matches(result, row: int = 0) -> list[dict]:
    """Row `row` of a `SearchResult` as the pipeline and the handler return it, best first: `[{"index": gallery row,
    **describe_match(...), "path": path, "file_status": status}, ...]` (`path` only when the gallery has paths;
    `file_status` only when the image's file was "deleted" or "changed" since indexing). The share "top p% of N" counts
    the images the search ranked (`result.searched`: with a filter, the images it let through)."""
    matches = []
    for position, (index, score) in enumerate(zip(result.indices[row].tolist(), result.scores[row].tolist())):
        match = {"index": index, **describe_match(position + 1, score, result.searched)}
        if result.paths is not None:
            match["path"] = result.paths[row][position]
        if (status := getattr(result, "status", None)) and status[row][position]:
            match["file_status"] = status[row][position]
        matches.append(match)
    return matches
