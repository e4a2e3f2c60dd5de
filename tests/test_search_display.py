"""decd.search.display: the one score wording (`describe_match`, `SCORE_EXPLANATION`) shared by the app,
`decd-search query`, the pipeline and the handler."""

import pytest
import torch

from decd.search import SCORE_EXPLANATION, SearchResult, describe_match, describe_matches
from decd.search.display import display_path, printable, top_percent


def test_describe_match_is_rank_share_and_cosine():
    assert top_percent(1, 400) == pytest.approx(0.25) and top_percent(10, 10) == 100
    match = describe_match(1, 0.28412, 400)
    assert match == dict(rank=1, score=0.28412, top_percent=pytest.approx(0.25), label="#1 · 0.284 · top 0.25% of 400")
    assert describe_match(3, -0.1, 9)["label"] == "#3 · -0.100 · top 33.3% of 9"
    assert "cosine" in SCORE_EXPLANATION and "top p%" in SCORE_EXPLANATION
    with pytest.raises(ValueError):
        top_percent(0, 5)


def test_describe_matches_is_one_result_row_in_readable_form():
    result = SearchResult(scores=torch.tensor([[0.5, 0.25], [0.75, 0.125]]), indices=torch.tensor([[3, 1], [0, 2]]),
                          paths=[["d.png", "b.png"], ["a.png", "c.png"]], searched=4)
    assert describe_matches(result, row=1) == [
        dict(index=0, path="a.png", **describe_match(1, 0.75, 4)),
        dict(index=2, path="c.png", **describe_match(2, 0.125, 4)),
    ]
    in_memory = SearchResult(scores=result.scores, indices=result.indices, paths=None, searched=4)  # PIL images
    assert [sorted(match) for match in describe_matches(in_memory)] == [
        ["index", "label", "rank", "score", "top_percent"]] * 2


def test_file_names_and_captions_are_printed_without_control_characters():
    hostile = "x\x1b[2J\x1b[31mred\nrank 1 0.9999 forged.png\r\u202egnp.exe"
    shown = display_path(hostile)
    assert "\x1b" not in shown and "\n" not in shown and "\r" not in shown and "\u202e" not in shown
    assert shown == "x\\x1b[2J\\x1b[31mred\\nrank 1 0.9999 forged.png\\r\\u202egnp.exe"
    assert printable("a woman in a café, 红色") == "a woman in a café, 红色"  # ordinary text untouched
    assert display_path("caf\udce9.png") == "caf\\xe9.png"  # bytes that are not UTF-8, as before
