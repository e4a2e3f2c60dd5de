"""The synthetic benchmark (decd.synthetic): layout, captions, determinism, caching."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import decd.synthetic as synthetic
from decd.data import load_person_search, num_identities
from decd.synthetic import (
    SYNTHETIC_VERSION,
    describe_identity,
    generate_synthetic_person_search,
    sample_identities,
)

from .conftest import TINY_SET as TINY


def test_synthetic_layout_follows_cuhk_pedes(tiny_set):
    records = json.loads((tiny_set / "reid_raw.json").read_text())
    assert isinstance(records, list) and len(records) == (6 + 2 + 3) * 2
    for record in records:
        assert set(record) == {"id", "file_path", "captions", "split", "processed_tokens"}
        assert isinstance(record["id"], int) and record["id"] >= 1
        assert record["split"] in ("train", "val", "test")
        assert len(record["captions"]) == 2 and all(isinstance(c, str) and c.strip() for c in record["captions"])
        assert len(record["processed_tokens"]) == 2
        with Image.open(tiny_set / "imgs" / record["file_path"]) as image:
            assert image.size == (64, 128) and image.mode == "RGB"
    ids_by_split = {split: {r["id"] for r in records if r["split"] == split} for split in ("train", "val", "test")}
    assert [len(ids_by_split[s]) for s in ("train", "val", "test")] == [6, 2, 3]
    assert not ids_by_split["train"] & ids_by_split["val"]
    assert not ids_by_split["train"] & ids_by_split["test"]
    assert not ids_by_split["val"] & ids_by_split["test"]
    meta = json.loads((tiny_set / "meta.json").read_text())
    assert meta["parameters"]["version"] == SYNTHETIC_VERSION
    assert len(meta["identities"]) == 11


def test_synthetic_has_detailed_and_vague_captions(tiny_set):
    records = json.loads((tiny_set / "reid_raw.json").read_text())
    word_counts = [len(caption.split()) for record in records for caption in record["captions"]]
    assert min(word_counts) <= 6, "expected some vague captions"
    assert max(word_counts) >= 14, "expected some detailed captions"


def _mentioned_attributes(caption: str, attributes) -> int:
    """How many of the identity's attributes a caption mentions (colour synonyms count)."""
    text = caption.lower()

    def color_words(color):
        return [color] + synthetic.COLOR_SYNONYMS.get(color, [])

    def mentions_color(color):
        return any(re.search(rf"\b{word}\b", text) for word in color_words(color))

    count = 0
    count += mentions_color(attributes.upper_color)
    count += any(word in text for word in synthetic.GARMENT_SYNONYMS[attributes.upper_type])
    if attributes.lower_type:
        count += mentions_color(attributes.lower_color)
        count += any(word in text for word in synthetic.GARMENT_SYNONYMS[attributes.lower_type])
    count += attributes.bag_type != "none" and attributes.bag_type in text
    count += attributes.hat_type != "none" and re.search(rf"\b{attributes.hat_type}\b", text) is not None
    count += 2 * ("hair" in text)  # length and colour
    count += "shoes" in text
    count += "glasses" in text
    return count


def test_describe_identity_detail_levels():
    rng = np.random.default_rng(0)
    for attributes in sample_identities(40, seed=3):
        detailed = describe_identity(attributes, rng, detailed=True)
        vague = describe_identity(attributes, rng, detailed=False)
        assert _mentioned_attributes(detailed, attributes) >= 5, detailed
        assert 1 <= _mentioned_attributes(vague, attributes) <= 2, vague
        assert "background" not in detailed


def test_sample_identities_are_distinct():
    identities = sample_identities(650, seed=0)
    assert len(set(identities)) == 650
    assert len({identity.clothing_key for identity in identities}) == 650
    assert identities == sample_identities(650, seed=0)
    assert identities != sample_identities(650, seed=1)


def test_synthetic_is_deterministic(tmp_path, tiny_set):
    again = generate_synthetic_person_search(tmp_path / "again", **TINY)
    assert _files(again) == _files(tiny_set)
    other_seed = generate_synthetic_person_search(tmp_path / "other", seed=1, **TINY)
    assert (other_seed / "reid_raw.json").read_bytes() != (tiny_set / "reid_raw.json").read_bytes()
    first_image = "imgs/train/00001_0.png"
    assert (other_seed / first_image).read_bytes() != (tiny_set / first_image).read_bytes()


def test_synthetic_val_and_test_do_not_move_when_the_training_set_grows(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "TRAIN_IDS_DRAWN_FIRST", 3)
    sizes = dict(num_val_ids=2, num_test_ids=2, images_per_id=1, progress=False)
    small = generate_synthetic_person_search(tmp_path / "small", num_train_ids=3, **sizes)
    large = generate_synthetic_person_search(tmp_path / "large", num_train_ids=6, **sizes)

    def by_split(root):
        records = json.loads((root / "reid_raw.json").read_text())
        return {split: [(r["id"], r["captions"], (root / "imgs" / r["file_path"]).read_bytes())
                        for r in records if r["split"] == split] for split in ("train", "val", "test")}

    small_splits, large_splits = by_split(small), by_split(large)
    assert large_splits["val"] == small_splits["val"] and large_splits["test"] == small_splits["test"]
    assert [r[0] for r in large_splits["val"]] == [4, 5] and [r[0] for r in large_splits["test"]] == [6, 7]
    # The first training identities are shared; the extra ones come after test, all distinct.
    assert large_splits["train"][:3] == small_splits["train"]
    assert [r[0] for r in large_splits["train"]] == [1, 2, 3, 8, 9, 10]
    meta = json.loads((large / "meta.json").read_text())
    assert len(meta["identities"]) == 10 and len(set(map(json.dumps, meta["identities"].values()))) == 10
    assert num_identities(load_person_search("synthetic", large, "train")) == 6


def test_sample_identities_keeps_reserved_clothing_out_of_later_draws():
    plain = sample_identities(1200, seed=0)
    reserved = sample_identities(1200, seed=0, reserve_clothing=range(500, 650))
    assert reserved[:650] == plain[:650]
    evaluation_clothing = {identity.clothing_key for identity in plain[500:650]}
    # Without the reservation the crowded clothing space makes later identities repeat those outfits.
    assert any(identity.clothing_key in evaluation_clothing for identity in plain[650:])
    assert not any(identity.clothing_key in evaluation_clothing for identity in reserved[650:])
    assert len(set(reserved)) == 1200


def test_synthetic_cache_hit_and_regeneration(tmp_path):
    root = generate_synthetic_person_search(tmp_path / "cache", **TINY)
    stamps = {path: os.stat(path).st_mtime_ns for path in (root / "meta.json", root / "reid_raw.json",
                                                           root / "imgs/train/00001_0.png")}
    inode = os.stat(root).st_ino
    assert generate_synthetic_person_search(tmp_path / "cache", **TINY) == root
    assert {path: os.stat(path).st_mtime_ns for path in stamps} == stamps
    assert os.stat(root).st_ino == inode

    # Other parameters regenerate in place.
    generate_synthetic_person_search(root, **{**TINY, "images_per_id": 3})
    meta = json.loads((root / "meta.json").read_text())
    assert meta["parameters"]["images_per_id"] == 3
    assert len(json.loads((root / "reid_raw.json").read_text())) == 11 * 3
    assert os.stat(root).st_ino != inode  # a new folder renamed into place
    # Only the finished folder is left: no staging or old copies next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_synthetic_default_root_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DECD_CACHE", str(tmp_path / "env-cache"))
    root = generate_synthetic_person_search(**TINY)
    assert root.parent == tmp_path / "env-cache"
    assert root.name.startswith("synthetic-v1-")  # non-default parameters never evict the default set


def test_interrupted_generation_leaves_no_cache(tmp_path, monkeypatch):
    calls = {"count": 0}
    real_render = synthetic.render_person

    def failing_render(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] > 5:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_person", failing_render)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_person_search(tmp_path / "set", **TINY)
    assert list(tmp_path.iterdir()) == []


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}
