"""Tests of the synthetic benchmark (decd.synthetic) and the dataset loader (decd.data).

Everything is generated in tmp_path: a tiny synthetic set and small annotation files in each format.
"""

import io
import json
import logging
from pathlib import Path

import numpy as np

import pytest
from datasets import Dataset, DatasetDict
from datasets import Image as ImageFeature
from PIL import Image

from decd.data import LoadReport, PersonSearchDataError, load_person_search, num_identities





# ------------------------------------------------------------------------------------------------
# decd.synthetic
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# decd.data: helpers writing small annotation files
# ------------------------------------------------------------------------------------------------


def _write_image(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 8), color).save(path)


def _write_dataset(root: Path, filename: str, records: list, path_field: str = "file_path") -> Path:
    """Writes the JSON and, for each record whose image path is safe, a tiny PNG under root/imgs."""
    root.mkdir(parents=True, exist_ok=True)
    for record in records:
        relative = (record.get(path_field) or record.get("img_path")) if isinstance(record, dict) else None
        if isinstance(relative, str) and relative and not relative.startswith(("/", "..")) and "missing" not in relative:
            _write_image(root / "imgs" / relative)
    annotation = root / filename
    annotation.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return annotation


def _record(person_id, path, captions, split, path_field="file_path"):
    return {"id": person_id, path_field: path, "captions": captions, "split": split}


def _cuhk_records(path_field="file_path"):
    """Train: ids 7, 3, 12 (non-contiguous, unsorted); val: id 20; test: ids 30, 31, two images each."""
    records = [
        _record(7, "train/7_0.jpg", ["a man in a red jacket", "red coat, black trousers"], "train", path_field),
        _record(3, "train/3_0.jpg", ["a woman in blue", "Une femme en bleu, très élégante ☂"], "train", path_field),
        _record(12, "train/12_0.jpg", ["a long caption " * 200], "train", path_field),
        _record(7, "train/7_1.jpg", ["a man in red", "the man wears a red jacket"], "train", path_field),
        _record(20, "val/20_0.jpg", ["a person with a backpack", "someone in green"], "val", path_field),
    ]
    for person_id in (30, 31):
        for k in range(2):
            records.append(_record(person_id, f"test/{person_id}_{k}.jpg", [f"person {person_id} view {k}", "a person"],
                                   "test", path_field))
    return records


# ------------------------------------------------------------------------------------------------
# decd.data: the three formats, custom and synthetic
# ------------------------------------------------------------------------------------------------


def test_cuhk_pedes_train(tmp_path):
    _write_dataset(tmp_path, "reid_raw.json", _cuhk_records())
    dataset, report = load_person_search("cuhk-pedes", tmp_path, split="train", return_report=True)
    assert isinstance(dataset, Dataset) and isinstance(report, LoadReport)
    assert set(dataset.column_names) == {"image", "image_path", "caption", "person_id", "raw_person_id", "image_id"}
    assert len(dataset) == 2 + 2 + 1 + 2
    assert dataset["raw_person_id"] == [7, 7, 3, 3, 12, 7, 7]
    assert dataset["person_id"] == [1, 1, 0, 0, 2, 1, 1]  # sorted raw ids 3, 7, 12 -> 0, 1, 2
    assert dataset["image_id"] == [0, 0, 1, 1, 2, 3, 3]
    assert num_identities(dataset) == 3 and report.num_identities == 3
    assert dataset.features["person_id"].int2str(2) == "12"
    assert dataset.features["raw_person_id"].dtype == "int64" and dataset.features["person_id"].dtype == "int64"
    assert dataset[2]["caption"] == "a woman in blue"
    assert dataset[3]["caption"] == "Une femme en bleu, très élégante ☂"  # non-ASCII kept
    assert len(dataset[4]["caption"]) == len("a long caption " * 200)  # long captions kept (tokenizer truncates)
    assert all(Path(path).is_absolute() for path in dataset["image_path"])
    assert dataset["image_path"][0] == str((tmp_path / "imgs/train/7_0.jpg").absolute())
    # The image column stores the path only and decodes on access.
    assert isinstance(dataset.features["image"], ImageFeature)
    raw = dataset.cast_column("image", ImageFeature(decode=False))[0]["image"]
    assert raw["bytes"] is None and raw["path"] == dataset[0]["image_path"]
    image = dataset[0]["image"]
    assert isinstance(image, Image.Image) and image.size == (4, 8)
    assert (report.num_images, report.num_captions, report.skipped) == (4, 7, [])


def test_cuhk_pedes_val_and_test(tmp_path):
    _write_dataset(tmp_path, "reid_raw.json", _cuhk_records())
    test = load_person_search("cuhk-pedes", tmp_path, split="test")
    assert isinstance(test, DatasetDict) and set(test) == {"gallery", "queries"}
    gallery, queries = test["gallery"], test["queries"]
    assert set(gallery.column_names) == {"image", "image_path", "image_id", "person_id"}
    assert set(queries.column_names) == {"caption", "person_id", "image_id"}
    assert gallery["person_id"] == [30, 30, 31, 31]  # raw identities
    assert gallery["image_id"] == [0, 1, 2, 3]
    assert len(queries) == 8
    assert queries["image_id"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert queries["person_id"] == [30, 30, 30, 30, 31, 31, 31, 31]
    assert isinstance(gallery[0]["image"], Image.Image)
    val = load_person_search("cuhk-pedes", tmp_path, split="val")
    assert (len(val["gallery"]), len(val["queries"])) == (1, 2)
    assert val["gallery"]["person_id"] == [20]


def test_icfg_pedes(tmp_path):
    records = [
        _record(1, "train/a.jpg", ["the only caption of a"], "train"),
        _record(2, "train/b.jpg", ["the only caption of b"], "train"),
        _record(5, "test/c.jpg", ["the only caption of c"], "test"),
    ]
    _write_dataset(tmp_path, "ICFG-PEDES.json", records)
    train = load_person_search("icfg-pedes", tmp_path)
    assert len(train) == 2 and train["person_id"] == [0, 1]
    test = load_person_search("ICFG-PEDES", tmp_path, split="test")
    assert (len(test["gallery"]), len(test["queries"])) == (1, 1)
    with pytest.raises(PersonSearchDataError, match=r"valid splits: \['train', 'test'\]"):
        load_person_search("icfg-pedes", tmp_path, split="val")


def test_rstpreid_uses_img_path(tmp_path):
    _write_dataset(tmp_path, "data_captions.json", _cuhk_records("img_path"), path_field="img_path")
    train = load_person_search("rstpreid", tmp_path)
    assert len(train) == 7 and num_identities(train) == 3
    test = load_person_search("rstpreid", tmp_path, split="test")
    assert (len(test["gallery"]), len(test["queries"])) == (4, 8)
    # A CUHK-style record lacks the field RSTPReid needs.
    _write_dataset(tmp_path / "wrong", "data_captions.json", _cuhk_records("file_path"))
    with pytest.raises(PersonSearchDataError, match="missing field 'img_path'"):
        load_person_search("rstpreid", tmp_path / "wrong")


def test_custom_dataset(tmp_path):
    records = _cuhk_records()
    records[1] = _record(3, "train/3_0.jpg", ["a woman in blue"], "train", "img_path")  # either field works
    _write_dataset(tmp_path / "default", "annotations.json", records)
    assert len(load_person_search("custom", tmp_path / "default")) == 6
    # annotation_file elsewhere: images next to it under imgs/ unless data_dir says otherwise.
    annotation = _write_dataset(tmp_path / "elsewhere", "my_annotations.json", records)
    train = load_person_search("custom", annotation_file=annotation)
    assert len(train) == 6
    assert train["image_path"][0] == str((tmp_path / "elsewhere/imgs/train/7_0.jpg").absolute())
    assert len(load_person_search("custom", tmp_path / "elsewhere", annotation_file=annotation)) == 6


def test_synthetic_through_the_loader(tiny_set):
    train, report = load_person_search("synthetic", tiny_set, return_report=True)
    assert len(train) == 6 * 2 * 2 and num_identities(train) == 6
    assert sorted(set(train["person_id"])) == list(range(6))
    assert report.num_images == 12
    test = load_person_search("synthetic", tiny_set, split="test")
    assert (len(test["gallery"]), len(test["queries"])) == (3 * 2, 3 * 2 * 2)
    assert test["gallery"][0]["image"].size == (64, 128)


# ------------------------------------------------------------------------------------------------
# decd.data: validation
# ------------------------------------------------------------------------------------------------


def _bad_dataset(tmp_path, bad_record, prepare=None):
    """The CUHK records with record 1 replaced by `bad_record`."""
    records = _cuhk_records()
    records[1] = bad_record
    _write_dataset(tmp_path, "reid_raw.json", records)
    if prepare:
        prepare(tmp_path)
    return tmp_path / "reid_raw.json"


def _write_garbage(root):
    (root / "imgs/train/broken.jpg").write_bytes(b"this is not an image")


def _truncate(root):
    path = root / "imgs/train/broken.png"
    Image.new("RGB", (32, 64), (10, 200, 30)).save(path)
    path.write_bytes(path.read_bytes()[:60])


BAD_RECORDS = {
    "missing captions": ({"id": 3, "file_path": "train/3_0.jpg", "split": "train"}, None, "missing field 'captions'"),
    "missing image path": ({"id": 3, "captions": ["x"], "split": "train"}, None, "missing field 'file_path'"),
    "missing id": ({"file_path": "train/3_0.jpg", "captions": ["x"], "split": "train"}, None, "missing field 'id'"),
    "missing split": ({"id": 3, "file_path": "train/3_0.jpg", "captions": ["x"]}, None, "missing field 'split'"),
    "bad id": (_record("three", "train/3_0.jpg", ["x"], "train"), None, "'id' must be an integer"),
    "unknown split in record": (_record(3, "train/3_0.jpg", ["x"], "validation"), None, "unknown split 'validation'"),
    "captions not a list": (_record(3, "train/3_0.jpg", "a woman in blue", "train"), None, "must be a list of strings"),
    "caption not a string": (_record(3, "train/3_0.jpg", ["ok", None], "train"), None, "must be a list of strings"),
    "empty captions list": (_record(3, "train/3_0.jpg", [], "train"), None, "'captions' is empty"),
    "empty caption": (_record(3, "train/3_0.jpg", ["ok", ""], "train"), None, "caption 1 is empty"),
    "whitespace caption": (_record(3, "train/3_0.jpg", ["   \n"], "train"), None, "every caption is empty"),
    "image missing": (_record(3, "train/missing.jpg", ["x"], "train"), None, "image file not found"),
    "image unreadable": (_record(3, "train/broken.jpg", ["x"], "train"), _write_garbage, "cannot be read"),
    "image truncated": (_record(3, "train/broken.png", ["x"], "train"), _truncate, "cannot be read"),
    "path escapes root": (_record(3, "../outside.jpg", ["x"], "train"), None, "leaves the image folder"),
    "absolute path": (_record(3, "/etc/passwd", ["x"], "train"), None, "leaves the image folder"),
    "not an object": (["3", "train/3_0.jpg"], None, "is a list, not an object"),
}


@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_bad_record_raises_with_file_and_record(tmp_path, kind):
    bad_record, prepare, reason = BAD_RECORDS[kind]
    annotation = _bad_dataset(tmp_path, bad_record, prepare)
    with pytest.raises(PersonSearchDataError) as raised:
        load_person_search("cuhk-pedes", tmp_path)
    message = str(raised.value)
    assert str(annotation) in message
    assert "record 1" in message and reason in message
    if isinstance(bad_record, dict) and "id" in bad_record:
        assert repr(bad_record["id"]) in message
    assert "1 problem(s)" in message and "skip_bad_records=True" in message

    # Skipping drops the record (or only its bad caption) and reports it.
    dataset, report = load_person_search("cuhk-pedes", tmp_path, skip_bad_records=True, return_report=True)
    assert len(report.skipped) == 1 and report.skipped[0].record_index == 1
    if kind == "empty caption":
        assert report.num_skipped_captions == 1 and report.skipped[0].caption_index == 1
        assert len(dataset) == 7 - 1
    else:
        assert report.num_skipped_records == 1
        assert len(dataset) == 7 - 2


def test_bad_record_of_another_split_does_not_matter(tmp_path):
    records = _cuhk_records()
    records[-1]["captions"] = [""]  # a test record
    _write_dataset(tmp_path, "reid_raw.json", records)
    assert len(load_person_search("cuhk-pedes", tmp_path)) == 7
    with pytest.raises(PersonSearchDataError, match="every caption is empty"):
        load_person_search("cuhk-pedes", tmp_path, split="test")


def test_unreadable_image_passes_without_verification(tmp_path):
    _bad_dataset(tmp_path, _record(3, "train/broken.jpg", ["x"], "train"), _write_garbage)
    assert len(load_person_search("cuhk-pedes", tmp_path, verify_images=False)) == 6


def test_all_problems_are_collected(tmp_path, caplog):
    records = _cuhk_records()
    records += [_record(100 + k, f"train/missing_{k}.jpg", ["x"], "train") for k in range(24)]
    records.append(_record(3, "train/3_0.jpg", ["fine", " "], "train"))
    records.append({"id": 9, "file_path": "train/missing_too.jpg", "captions": "x", "split": "train"})  # 2 problems
    _write_dataset(tmp_path, "reid_raw.json", records)
    with pytest.raises(PersonSearchDataError) as raised:
        load_person_search("cuhk-pedes", tmp_path)
    message = str(raised.value)
    assert "27 problem(s)" in message and "... and 7 more" in message
    assert message.count("\n  - ") == 20

    with caplog.at_level(logging.WARNING, logger="decd.data"):
        dataset, report = load_person_search("cuhk-pedes", tmp_path, skip_bad_records=True, return_report=True)
    assert len(dataset) == 7 + 1
    assert report.num_skipped_records == 25 and report.num_skipped_captions == 1
    assert report.skipped_record_indices == list(range(len(_cuhk_records()), len(_cuhk_records()) + 24)) + [len(records) - 1]
    assert [item.person_id for item in report.skipped[:2]] == [100, 101]
    assert "skipped 25 record(s) and 1 caption(s)" in caplog.text
    assert "missing_0.jpg" in caplog.text


def test_annotation_file_problems(tmp_path):
    with pytest.raises(PersonSearchDataError, match=r"annotation file not found: .*reid_raw\.json"):
        load_person_search("cuhk-pedes", tmp_path)
    (tmp_path / "reid_raw.json").write_text(json.dumps({"records": []}))
    with pytest.raises(PersonSearchDataError, match="must contain a JSON list of records, got a dict"):
        load_person_search("cuhk-pedes", tmp_path)
    (tmp_path / "reid_raw.json").write_text("[{'id': 1}")
    with pytest.raises(PersonSearchDataError, match="not valid UTF-8 JSON"):
        load_person_search("cuhk-pedes", tmp_path)
    with pytest.raises(PersonSearchDataError, match="needs data_dir"):
        load_person_search("rstpreid")


def test_empty_split(tmp_path):
    _write_dataset(tmp_path, "reid_raw.json", [r for r in _cuhk_records() if r["split"] != "val"])
    with pytest.raises(PersonSearchDataError, match="split 'val' has no usable records"):
        load_person_search("cuhk-pedes", tmp_path, split="val")
    # Everything skipped is an empty split too.
    _write_dataset(tmp_path / "all-bad", "reid_raw.json", [_record(1, "train/missing.jpg", ["x"], "train")])
    with pytest.raises(PersonSearchDataError, match=r"no usable records \(1 skipped\)"):
        load_person_search("cuhk-pedes", tmp_path / "all-bad", skip_bad_records=True)


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(PersonSearchDataError, match=r"unknown dataset 'market-1501'.*cuhk-pedes"):
        load_person_search("market-1501", tmp_path)
    with pytest.raises(PersonSearchDataError, match=r"unknown split 'validation' for cuhk-pedes; valid splits: \['train', 'val', 'test'\]"):
        load_person_search("cuhk-pedes", tmp_path, split="validation")
    assert issubclass(PersonSearchDataError, ValueError)


# ----------------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------------
def _custom(root: Path, records: list, images: dict) -> Path:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for name, writer in images.items():
        writer(root / "imgs" / name)
    (root / "annotations.json").write_text(json.dumps(records))
    return root


def _png(path: Path, color=(200, 30, 30)) -> None:
    Image.new("RGB", (16, 32), color).save(path)


def _truncated_file(fmt: str):
    def write(path: Path) -> None:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(buffer, format=fmt)
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    return write


def test_truncated_jpeg_and_bmp_are_named_and_skippable(tmp_path):
    records = [dict(id=i, file_path=name, captions=[f"person {i}"], split="train")
               for i, name in enumerate(["good.png", "cut.jpg", "cut.bmp", "also_good.png"])]
    root = _custom(tmp_path, records, {"good.png": _png, "also_good.png": _png, "cut.jpg": _truncated_file("JPEG"),
                                       "cut.bmp": _truncated_file("BMP")})
    with pytest.raises(PersonSearchDataError) as error:
        load_person_search("custom", root, split="train")
    message = str(error.value)
    assert "2 problem(s)" in message and "cut.jpg" in message and "cut.bmp" in message
    dataset, report = load_person_search("custom", root, split="train", skip_bad_records=True, return_report=True)
    assert len(dataset) == 2 and report.skipped_record_indices == [1, 2]
    assert all("cannot be read" in item.reason for item in report.skipped)


def test_symlinks_leaving_the_image_folder_are_caught(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    _png(outside / "secret.png")
    records = [dict(id=1, file_path="inside.png", captions=["a"], split="train"),
               dict(id=2, file_path="link.png", captions=["b"], split="train"),
               dict(id=3, file_path="folder/secret.png", captions=["c"], split="train")]
    root = _custom(tmp_path / "data", records, {"inside.png": _png})
    (root / "imgs" / "link.png").symlink_to(outside / "secret.png")
    (root / "imgs" / "folder").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PersonSearchDataError) as error:
        load_person_search("custom", root, split="train")
    assert "link.png" in str(error.value) and "folder/secret.png" in str(error.value)
    assert "leaves the image folder" in str(error.value)


def test_identity_ids_from_json_are_mapped_or_refused_by_record(tmp_path):
    good = [("0042", 42), ("-5", -5), (7, 7), ("+8", 8), (2**63 - 1, 2**63 - 1)]
    records = [dict(id=raw, file_path=f"{i}.png", captions=[f"person {i}"], split="train")
               for i, (raw, _) in enumerate(good)]
    root = _custom(tmp_path / "good", records, {f"{i}.png": _png for i in range(len(good))})
    dataset = load_person_search("custom", root, split="train")
    assert sorted(set(dataset["raw_person_id"])) == sorted(value for _, value in good)
    assert sorted(set(dataset["person_id"])) == list(range(len(good)))  # contiguous
    bad = [2**70, "²", "4 2", 3.0, True, None, "", "1_000", [1]]
    records = [dict(id=raw, file_path="0.png", captions=["a"], split="train") for raw in bad]
    root = _custom(tmp_path / "bad", records, {"0.png": _png})
    with pytest.raises(PersonSearchDataError) as error:
        load_person_search("custom", root, split="train")
    message = str(error.value)
    assert f"{len(bad)} problem(s)" in message and "annotations.json" in message
    assert "does not fit in 64 bits" in message and "record 0" in message and f"record {len(bad) - 1}" in message


# ------------------------------------------------------------------------------------------------
# Annotation files as annotation tools write them; records that repeat or share an image
# ------------------------------------------------------------------------------------------------
def test_a_byte_order_mark_and_json_lines_are_read(tmp_path):
    records = _cuhk_records()
    root = _write_dataset(tmp_path / "plain", "reid_raw.json", records).parent
    expected = load_person_search("cuhk-pedes", root, split="train")
    (root / "reid_raw.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())  # UTF-8 with a BOM
    assert load_person_search("cuhk-pedes", root, split="train")["caption"] == expected["caption"]
    (root / "reid_raw.json").write_text("\n".join(json.dumps(record) for record in records) + "\n")  # JSON Lines
    assert load_person_search("cuhk-pedes", root, split="train")["caption"] == expected["caption"]
    lines = (root / "reid_raw.json").read_text().splitlines()
    (root / "reid_raw.json").write_text("\n".join(lines[:2] + ["{'id': 1}"] + lines[2:]))
    with pytest.raises(PersonSearchDataError, match=r"reads as JSON Lines, but line 3 is not JSON"):
        load_person_search("cuhk-pedes", root, split="train")


def test_repeated_records_and_images_shared_by_identities_or_splits_are_reported(tmp_path):
    records = _cuhk_records()
    train = [index for index, record in enumerate(records) if record["split"] == "train"]
    test = next(record for record in records if record["split"] == "test")
    copy = dict(records[train[0]])
    other_identity = dict(records[train[1]], id=999)
    leak = dict(test, split="train", id=records[train[2]]["id"])
    root = _write_dataset(tmp_path, "reid_raw.json", records + [copy, other_identity, leak]).parent
    with pytest.raises(PersonSearchDataError) as error:
        load_person_search("cuhk-pedes", root, split="train")
    message = str(error.value)
    n = len(records)
    assert "3 problem(s)" in message
    assert f"record {n} " in message and f"repeats record {train[0]}" in message
    assert f"shows the same image as record {train[1]}, which gives it identity" in message
    assert "of split 'test': an image in two splits leaks one into the other" in message
    # The test split reports its side of the leak too; skipping is explicit and listed.
    with pytest.raises(PersonSearchDataError, match=r"of split 'train': an image in two splits leaks"):
        load_person_search("cuhk-pedes", root, split="test")
    dataset, report = load_person_search("cuhk-pedes", root, split="train", skip_bad_records=True, return_report=True)
    assert report.skipped_record_indices == [n, n + 1, n + 2]
    clean = _write_dataset(tmp_path / "clean", "reid_raw.json", records).parent
    assert len(dataset) == len(load_person_search("cuhk-pedes", clean, split="train"))


@pytest.mark.parametrize("caption, accepted", [
    ("a woman in a red coat", True), ("红色外套的女人", True), ("person 42", True),
    ("...!?", False), ("the a of with", False), ("\u200b\u200b", False), ("\u00a0\u00a0", False), ("", False),
])
def test_one_rule_for_what_a_caption_holds_in_the_loader_and_the_processor(tmp_path, processor, caption, accepted):
    records = [dict(id=1, file_path="train/1_0.jpg", captions=[caption], split="train"),
               dict(id=2, file_path="train/2_0.jpg", captions=["a man in a blue shirt"], split="train")]
    root = _write_dataset(tmp_path, "reid_raw.json", records).parent
    if accepted:
        assert len(load_person_search("cuhk-pedes", root, split="train")) == 2
        processor(text=caption)
        return
    with pytest.raises(PersonSearchDataError, match=r"record 0 .*every caption is empty or has no word"):
        load_person_search("cuhk-pedes", root, split="train")
    with pytest.raises(ValueError, match=r"Caption 0 is (empty|made of punctuation or function words only)"):
        processor(text=caption)
