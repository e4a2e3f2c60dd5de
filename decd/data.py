"""Loading text-based person search benchmarks as `datasets` objects.

One entry point, `load_person_search`, reads CUHK-PEDES, ICFG-PEDES, RSTPReid, the embedded synthetic
benchmark or any JSON in the CUHK-PEDES shape (see `docs/protocol.md`):

- split "train" -> a `datasets.Dataset` with one row per (image, caption) pair:
  `image` (`datasets.Image()`, decoded lazily from the file), `image_path` (absolute str), `caption`,
  `person_id` (contiguous 0..N-1 over the train identities in sorted raw-id order; a `ClassLabel`
  whose names are the raw ids, so `num_identities(dataset)` is N), `raw_person_id` (the id in the
  file), `image_id` (index of the image within the split).
- split "val" / "test" -> a `datasets.DatasetDict` with
  "gallery" (one row per image: `image`, `image_path`, `image_id`, `person_id` = RAW id) and
  "queries" (one row per caption: `caption`, `person_id` = RAW id, `image_id` of its image).

Every problem in the annotations (missing fields, empty captions, missing or unreadable images,
paths escaping the image folder, ...) is collected and reported in one `PersonSearchDataError`
naming the file and the record; `skip_bad_records=True` skips them instead, logs them, and lists
them in the `LoadReport` (`return_report=True`).
"""

from __future__ import annotations

import json
import logging
import ntpath
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from tqdm.auto import tqdm

from captions_decd import caption_problem
from image_loading_decd import load_image

logger = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 20
_INTEGER_ID = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() also takes "٤٢" and "1_000"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Verifying images is I/O bound; a progress bar only pays off for large splits.
PROGRESS_BAR_MIN_IMAGES = 2000


class PersonSearchDataError(ValueError):
    """The annotations or images of a person search dataset are missing or malformed."""


@dataclass(frozen=True)
class DatasetFormat:
    """Where a benchmark keeps its annotations and how its records name their image."""

    annotation_file: str
    path_fields: tuple[str, ...]  # the first present one is used
    splits: tuple[str, ...]


DATASET_FORMATS: dict[str, DatasetFormat] = {
    "cuhk-pedes": DatasetFormat("reid_raw.json", ("file_path",), ("train", "val", "test")),
    "icfg-pedes": DatasetFormat("ICFG-PEDES.json", ("file_path",), ("train", "test")),
    "rstpreid": DatasetFormat("data_captions.json", ("img_path",), ("train", "val", "test")),
    "synthetic": DatasetFormat("reid_raw.json", ("file_path",), ("train", "val", "test")),
    "custom": DatasetFormat("annotations.json", ("file_path", "img_path"), ("train", "val", "test")),
}


@dataclass
class SkippedRecord:
    """One record (or one caption of it, `caption_index` set) left out by `skip_bad_records=True`."""

    record_index: int  # position in the JSON list
    person_id: Any  # raw `id` as found in the file (None when missing)
    image: Optional[str]  # the record's image path as written in the file
    reason: str
    caption_index: Optional[int] = None


@dataclass
class LoadReport:
    """What `load_person_search` read, for logging and for checking how much was skipped."""

    dataset_name: str
    split: str
    annotation_file: str
    image_root: str
    num_images: int = 0
    num_captions: int = 0
    num_identities: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)

    @property
    def skipped_record_indices(self) -> list[int]:
        """Positions (in the JSON list) of the records left out entirely; a record may have several problems."""
        return sorted({item.record_index for item in self.skipped if item.caption_index is None})

    @property
    def num_skipped_records(self) -> int:
        return len(self.skipped_record_indices)

    @property
    def num_skipped_captions(self) -> int:
        """Empty captions dropped from records that were otherwise kept."""
        dropped = set(self.skipped_record_indices)
        return sum(1 for item in self.skipped if item.caption_index is not None and item.record_index not in dropped)


def num_identities(dataset: Dataset) -> int:
    """Number of training identities N of a train split from `load_person_search` (person_id in 0..N-1)."""
    feature = dataset.features["person_id"]
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    # val/test (raw ids) or a dataset built elsewhere: count the distinct identities.
    return len(set(dataset["person_id"]))


def _normalize_name(dataset_name: str) -> str:
    name = str(dataset_name).strip().lower().replace("_", "-")
    return {"cuhk": "cuhk-pedes", "cuhkpedes": "cuhk-pedes", "icfg": "icfg-pedes", "icfgpedes": "icfg-pedes",
            "rstp": "rstpreid", "rstp-reid": "rstpreid"}.get(name, name)


def _describe(index: int, record: Any, path_fields: tuple[str, ...]) -> str:
    """'record 12 (id 7, "CUHK01/0001.png")' — enough to find it in the JSON."""
    if not isinstance(record, dict):
        return f"record {index}"
    image = next((record[name] for name in path_fields if name in record), None)
    parts = []
    if "id" in record:
        parts.append(f"id {record['id']!r}")
    if image is not None:
        parts.append(repr(image))
    return f"record {index}" + (f" ({', '.join(parts)})" if parts else "")


def _resolve_image(image_root: Path, relative: str) -> Optional[Path]:
    """The image path under `image_root`, or None when `relative` is absolute or escapes it (also by a symlink)."""
    if posixpath.isabs(relative) or ntpath.isabs(relative) or ntpath.splitdrive(relative)[0]:
        return None
    normalized = posixpath.normpath(relative.replace("\\", "/"))
    if normalized == ".." or normalized.startswith("../") or normalized == ".":
        return None
    path = image_root / normalized
    # A symbolic link (of the file or of a folder on the way) may still lead outside the image folder.
    if not path.resolve().is_relative_to(image_root.resolve()):
        return None
    return path


def _verify_image(path: Path) -> Optional[str]:
    """None if `load_image` decodes the file completely, else the reason it cannot."""
    try:
        load_image(path, name=str(path))
    except ValueError as error:  # load_image names the file and says what is wrong
        return str(error).removeprefix(f"{path}: ").removesuffix("; replace the file.")
    return None


def without_image_decoding(dataset):
    """`dataset` with its `image` column left as stored ({"path", "bytes"}): `load_image` decodes it later.

    Training and evaluation read images this way so that they go through the one image path every
    entry point shares, not through `datasets`' own decoder (which differs on 16-bit files, alpha, ...).
    """
    feature = dataset.features.get("image")
    if isinstance(feature, Image) and feature.decode:
        return dataset.cast_column("image", Image(decode=False))
    return dataset


def image_sources(dataset) -> list:
    """The `image` column of a gallery or training split as `load_image` sources (paths / bytes, not pixels)."""
    return list(without_image_decoding(dataset)["image"])


def _verify_images(paths: list[Path], show_progress: bool) -> list[Optional[str]]:
    if not paths:
        return []
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_verify_image, paths, chunksize=64)
        return list(tqdm(results, total=len(paths), desc="verifying images", unit="img",
                         disable=not show_progress))


def _load_records(annotation_file: Path) -> list:
    if not annotation_file.is_file():
        raise PersonSearchDataError(
            f"annotation file not found: {annotation_file}. Expected the dataset's JSON list of records "
            f"next to the 'imgs/' folder; pass data_dir= (or annotation_file=) pointing at it."
        )
    try:
        text = annotation_file.read_bytes().decode("utf-8-sig")  # a byte-order mark (as some editors write) is fine
    except UnicodeDecodeError as error:
        raise PersonSearchDataError(f"{annotation_file} is not UTF-8 text ({error}); save it as UTF-8") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        records = _json_lines(annotation_file, text, error)
    if not isinstance(records, list):
        raise PersonSearchDataError(
            f"{annotation_file} must contain a JSON list of records, got a {type(records).__name__}; "
            f"each record is an object with 'id', the image path, 'captions' and 'split'."
        )
    return records


def _json_lines(annotation_file: Path, text: str, error: json.JSONDecodeError) -> list:
    """The records of a JSON Lines file (one JSON object per line, as many annotation tools write), or the error
    naming the format and the line that is neither."""
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    try:
        first = json.loads(lines[0][1]) if lines else None
    except json.JSONDecodeError:
        first = None
    if not isinstance(first, dict):
        raise PersonSearchDataError(f"{annotation_file} is not valid UTF-8 JSON: neither a JSON list of records nor "
                                    f"JSON Lines (one record object per line): {error}") from None
    records = []
    for number, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as line_error:
            raise PersonSearchDataError(f"{annotation_file} reads as JSON Lines, but line {number} is not JSON "
                                        f"({line_error}); fix that line") from None
    return records


def _identity_key(value: Any) -> Any:
    """An identity as `_check_record` reads it ("0042" and 42 are one identity), or the raw value."""
    if isinstance(value, (int, str)) and not isinstance(value, bool) and _INTEGER_ID.fullmatch(str(value).strip()):
        return int(value)
    return value


def _shared_images(records: list, path_fields: tuple[str, ...]) -> dict[int, str]:
    """{record index: why} for records whose image another record also names: a repeat of the same record, the
    same image under another identity, or the same image in another split (test data leaking into training)."""
    first: dict[str, tuple[int, Any]] = {}
    found = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            continue
        image = next((record[name] for name in path_fields if isinstance(record.get(name), str)), None)
        if image is None:
            continue
        key = posixpath.normpath(image.replace("\\", "/"))
        if key not in first:
            first[key] = (index, record)
            continue
        earlier_index, earlier = first[key]
        if earlier.get("split") != record.get("split"):
            leak = "an image in two splits leaks one into the other; remove one of the records (or pass " \
                   "skip_bad_records to leave it out here)"
            found.setdefault(earlier_index, f"shows the same image as record {index} of split "
                                            f"{record.get('split')!r}: {leak}")
            found[index] = f"shows the same image as record {earlier_index} of split {earlier.get('split')!r}: {leak}"
        elif _identity_key(earlier.get("id")) != _identity_key(record.get("id")):
            found[index] = (f"shows the same image as record {earlier_index}, which gives it identity "
                            f"{earlier.get('id')!r}: one image, one identity")
        elif earlier.get("captions") == record.get("captions"):
            found[index] = f"repeats record {earlier_index}: remove the copy"
    return found


def _locate(
    name: str, data_dir: Optional[Union[str, os.PathLike]], annotation_file: Optional[Union[str, os.PathLike]]
) -> tuple[Path, Path]:
    """(annotation file, image root) for a dataset name."""
    if name == "synthetic" and annotation_file is None:
        from .synthetic import generate_synthetic_person_search

        # An existing folder is used as is (e.g. generated with custom parameters); otherwise the
        # default benchmark is generated into it (or into the cache when data_dir is None).
        if data_dir is None or not (Path(data_dir) / "reid_raw.json").is_file():
            data_dir = generate_synthetic_person_search(root=data_dir)
    if annotation_file is not None:
        annotation_path = Path(annotation_file).expanduser().absolute()
        image_root = Path(data_dir) / "imgs" if data_dir is not None else annotation_path.parent / "imgs"
    else:
        if data_dir is None:
            raise PersonSearchDataError(
                f"load_person_search({name!r}) needs data_dir= (the folder holding "
                f"{DATASET_FORMATS[name].annotation_file} and imgs/)"
                + (" or annotation_file=" if name == "custom" else "")
            )
        annotation_path = Path(data_dir).expanduser().absolute() / DATASET_FORMATS[name].annotation_file
        image_root = Path(data_dir) / "imgs"
    return annotation_path, image_root.expanduser().absolute()


def load_person_search(
    dataset_name: str,
    data_dir: Optional[Union[str, os.PathLike]] = None,
    split: str = "train",
    skip_bad_records: bool = False,
    annotation_file: Optional[Union[str, os.PathLike]] = None,
    verify_images: bool = True,
    return_report: bool = False,
) -> Union[Dataset, DatasetDict, tuple[Union[Dataset, DatasetDict], LoadReport]]:
    """Load one split of a text-based person search benchmark.

    Args:
        dataset_name: "cuhk-pedes", "icfg-pedes", "rstpreid", "synthetic" or "custom".
        data_dir: folder holding the annotation JSON and `imgs/`. Optional for "synthetic" (the cached
            default benchmark; an empty or new folder gets it generated) and for "custom" when
            `annotation_file` is given (images are then under the JSON's folder + `imgs/`).
        split: "train", "val" or "test" (ICFG-PEDES has no "val").
        skip_bad_records: skip malformed records and empty captions (logged and listed in the report)
            instead of raising.
        annotation_file: overrides the dataset's JSON file; for "custom" the default is
            `data_dir/annotations.json`. Records may name their image by `file_path` or `img_path`.
        verify_images: decode each image completely with `load_image` (the loader every entry point
            uses) to catch unreadable or truncated files before training; existence is always checked.
        return_report: also return a `LoadReport`.

    Returns:
        train: a `Dataset` of (image, caption) pairs with columns `image`, `image_path`, `caption`,
        `person_id` (ClassLabel, 0..N-1; `num_identities(dataset)` gives N), `raw_person_id`, `image_id`.
        val/test: a `DatasetDict` with "gallery" (`image`, `image_path`, `image_id`, `person_id` raw)
        and "queries" (`caption`, `person_id` raw, `image_id`).
        With `return_report=True`, a tuple (dataset, LoadReport).

    Raises:
        PersonSearchDataError: unknown dataset or split, missing or malformed annotation file, bad
            records (all are collected; the message lists the first 20 and the total), or an empty split.
    """
    name = _normalize_name(dataset_name)
    if name not in DATASET_FORMATS:
        raise PersonSearchDataError(
            f"unknown dataset {dataset_name!r}; choose one of {sorted(DATASET_FORMATS)} "
            f"('custom' reads any JSON in the CUHK-PEDES shape)."
        )
    dataset_format = DATASET_FORMATS[name]
    if split not in dataset_format.splits:
        raise PersonSearchDataError(
            f"unknown split {split!r} for {name}; valid splits: {list(dataset_format.splits)}"
            + (" (ICFG-PEDES has no validation split: select on a held-out part of train, or use test and say so)"
               if name == "icfg-pedes" and split in ("val", "validation") else "")
        )
    annotation_path, image_root = _locate(name, data_dir, annotation_file)
    records = _load_records(annotation_path)
    report = LoadReport(dataset_name=name, split=split, annotation_file=str(annotation_path), image_root=str(image_root))

    problems: list[str] = []  # messages of every problem, in file order
    images: list[tuple[int, int, Path, list[str]]] = []  # (record index, raw id, path, captions)
    bad_records: set[int] = set()

    def problem(index: int, record: Any, reason: str, caption_index: Optional[int] = None) -> None:
        problems.append(f"{_describe(index, record, dataset_format.path_fields)}: {reason}")
        fields = record if isinstance(record, dict) else {}
        image = next((fields[name] for name in dataset_format.path_fields if name in fields), None)
        report.skipped.append(SkippedRecord(index, fields.get("id"), None if image is None else str(image), reason,
                                            caption_index))
        if caption_index is None:
            bad_records.add(index)

    shared = _shared_images(records, dataset_format.path_fields)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            problem(index, record, f"is a {type(record).__name__}, not an object")
            continue
        record_split = record.get("split")
        if record_split is None:
            problem(index, record, "missing field 'split'")
            continue
        if record_split not in dataset_format.splits:
            problem(index, record, f"unknown split {record_split!r} (valid: {list(dataset_format.splits)})")
            continue
        if record_split != split:
            continue
        if index in shared:
            problem(index, record, shared[index])
            continue
        checked = _check_record(index, record, dataset_format, image_root, problem)
        if checked is not None:
            images.append(checked)

    if verify_images and images:
        reasons = _verify_images([path for _, _, path, _ in images], len(images) >= PROGRESS_BAR_MIN_IMAGES)
        for (index, _, path, _), reason in zip(images, reasons):
            if reason is not None:
                problem(index, records[index], f"image {path} cannot be read ({reason}); replace the file or remove the record")
        images = [item for item in images if item[0] not in bad_records]

    if problems:
        listed = "\n".join(f"  - {message}" for message in problems[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        if not skip_bad_records:
            raise PersonSearchDataError(
                f"{annotation_path}: {len(problems)} problem(s) in split {split!r} (images under {image_root}):\n"
                f"{listed}{more}\nFix the records, or pass skip_bad_records=True to skip them (they are logged "
                f"and listed in the LoadReport)."
            )
        logger.warning("%s: skipped %d record(s) and %d caption(s) of split %r:\n%s%s", annotation_path,
                       report.num_skipped_records, report.num_skipped_captions, split, listed, more)
    if not images:
        raise PersonSearchDataError(
            f"{annotation_path}: split {split!r} has no usable records"
            + (f" ({len(report.skipped)} skipped)" if report.skipped else "")
            + f"; check the records' 'split' field (valid: {list(dataset_format.splits)})."
        )

    report.num_images = len(images)
    report.num_captions = sum(len(captions) for _, _, _, captions in images)
    report.num_identities = len({person_id for _, person_id, _, _ in images})
    dataset = _build_train(images) if split == "train" else _build_evaluation(images)
    return (dataset, report) if return_report else dataset


def _check_record(index: int, record: dict, dataset_format: DatasetFormat, image_root: Path, problem):
    """(index, raw id, image path, good captions), or None after reporting why the record is unusable."""
    reasons: list[str] = []  # what makes the whole record unusable, reported in this order
    person_id = record.get("id")
    if "id" not in record:
        reasons.append("missing field 'id'")
    elif isinstance(person_id, bool) or not isinstance(person_id, (int, str)) or (
        isinstance(person_id, str) and not _INTEGER_ID.fullmatch(person_id.strip())
    ):
        reasons.append(f"'id' must be an integer (or a string of ASCII digits such as \"0042\"), "
                       f"got {_short(person_id)}")
    elif not _INT64_MIN <= int(person_id) <= _INT64_MAX:
        reasons.append(f"'id' {_short(person_id)} does not fit in 64 bits; renumber the identities")
    else:
        person_id = int(person_id)  # "0042" and 42 name the same identity

    path_field = next((name for name in dataset_format.path_fields if name in record), None)
    image_path = None
    if path_field is None:
        reasons.append(f"missing field {' or '.join(repr(f) for f in dataset_format.path_fields)}")
    elif not isinstance(record[path_field], str) or not record[path_field].strip():
        reasons.append(f"{path_field!r} must be a non-empty string, got {record[path_field]!r}")
    else:
        image_path = _resolve_image(image_root, record[path_field])
        if image_path is None:
            reasons.append(f"image path {record[path_field]!r} is absolute or leaves the image folder {image_root}; "
                           f"paths must be relative to it")
        elif not image_path.is_file():
            reasons.append(f"image file not found: {image_path}")

    captions = record.get("captions")
    good_captions: list[str] = []
    caption_problems: list = []
    if "captions" not in record:
        reasons.append("missing field 'captions'")
    elif not isinstance(captions, list) or not all(isinstance(caption, str) for caption in captions):
        reasons.append(f"'captions' must be a list of strings, got {_short(captions)}")
    elif not captions:
        reasons.append("'captions' is empty")
    elif not reasons:
        caption_problems = [caption_problem(caption) for caption in captions]  # the processor's rule
        good_captions = [caption for caption, bad in zip(captions, caption_problems) if bad is None]
        if not good_captions:
            reasons.append(f"every caption is empty or has no word to search by: {_short(captions)}")
    for reason in reasons:
        problem(index, record, reason)
    if reasons:
        return None
    for caption_index, bad in enumerate(caption_problems):  # only those captions are bad; the record keeps the others
        if bad is not None:
            problem(index, record, f"caption {caption_index} is {bad}", caption_index=caption_index)
    return index, person_id, image_path, good_captions


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _build_train(images: list[tuple[int, int, Path, list[str]]]) -> Dataset:
    raw_ids = sorted({person_id for _, person_id, _, _ in images})
    contiguous = {raw_id: position for position, raw_id in enumerate(raw_ids)}
    columns: dict[str, list] = {name: [] for name in ("image", "image_path", "caption", "person_id", "raw_person_id", "image_id")}
    for image_id, (_, person_id, path, captions) in enumerate(images):
        for caption in captions:
            columns["image"].append(str(path))
            columns["image_path"].append(str(path))
            columns["caption"].append(caption)
            columns["person_id"].append(contiguous[person_id])
            columns["raw_person_id"].append(person_id)
            columns["image_id"].append(image_id)
    features = Features({
        "image": Image(),
        "image_path": Value("string"),
        "caption": Value("string"),
        # A ClassLabel keeps N (num_classes) and the raw id of each class (names) with the data.
        "person_id": ClassLabel(names=[str(raw_id) for raw_id in raw_ids]),
        "raw_person_id": Value("int64"),
        "image_id": Value("int64"),
    })
    return Dataset.from_dict(columns, features=features)


def _build_evaluation(images: list[tuple[int, int, Path, list[str]]]) -> DatasetDict:
    paths = [str(path) for _, _, path, _ in images]
    gallery = Dataset.from_dict(
        {"image": paths, "image_path": paths, "image_id": list(range(len(images))),
         "person_id": [person_id for _, person_id, _, _ in images]},
        features=Features({"image": Image(), "image_path": Value("string"), "image_id": Value("int64"),
                           "person_id": Value("int64")}),
    )
    queries: dict[str, list] = {"caption": [], "person_id": [], "image_id": []}
    for image_id, (_, person_id, _, captions) in enumerate(images):
        for caption in captions:
            queries["caption"].append(caption)
            queries["person_id"].append(person_id)
            queries["image_id"].append(image_id)
    queries_dataset = Dataset.from_dict(
        queries, features=Features({"caption": Value("string"), "person_id": Value("int64"), "image_id": Value("int64")})
    )
    return DatasetDict({"gallery": gallery, "queries": queries_dataset})
