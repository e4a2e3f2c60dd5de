"""The metadata sidecar CSV of a Milvus gallery (`--metadata crops.csv`): one row per image, keyed by `path`,
its columns typed as INT64, DOUBLE or VARCHAR scalar fields that filters can use."""

from __future__ import annotations

import contextlib
import csv
import math
import re
from typing import Optional

from ..display import display_path
from ..errors import MilvusStoreError
from ..format import PathLike
from .store import MAX_TEXT_BYTES, NAME_PATTERN, OWN_FIELDS, PATH_FIELD

_INT64 = (-(1 << 63), (1 << 63) - 1)


class MetadataRowsWarning(UserWarning):
    """Rows of a metadata CSV whose path names no image of the gallery: named, and not stored."""


def _metadata_type(values: list[str]) -> str:
    """int when every value is an integer in int64's range, float when every value is a finite number, else str."""
    if all(re.fullmatch(r"[+-]?\d+", value) and _INT64[0] <= int(value) <= _INT64[1] for value in values):
        return "int"
    with contextlib.suppress(ValueError):
        if all(math.isfinite(float(value)) for value in values):
            return "float"
    return "str"


def _typed(value: str, kind: str, where: str):
    """`value` (CSV text) as `kind`; MilvusStoreError naming `where` when it is not one."""
    try:
        if kind in ("int", "float"):
            number = int(value) if kind == "int" else float(value)
            if not (_INT64[0] <= number <= _INT64[1] if kind == "int" else math.isfinite(number)):
                raise ValueError(value)
            return number
    except ValueError:
        raise MilvusStoreError(f"{where}: {value!r} is not {'an integer' if kind == 'int' else 'a finite number'}, "
                               f"the field's type") from None
    if len(value.encode("utf-8", "surrogateescape")) > MAX_TEXT_BYTES:
        raise MilvusStoreError(f"{where}: the value is longer than Milvus's {MAX_TEXT_BYTES} bytes")
    return value


def read_metadata(csv_path: PathLike, types: Optional[dict] = None) -> tuple[dict, dict]:
    """(field types {column: "int"|"float"|"str"}, {path: {column: value}}) of a metadata CSV.

    The CSV has a `path` column (the image's path relative to the gallery folder, as `decd-search` prints it) and
    one column per field; every cell holds a value (Milvus scalar fields have no null). Each column's type is
    inferred (`_metadata_type`), or given by `types` (an existing collection's fields: the CSV must have exactly
    those columns). Raises MilvusStoreError naming the file, the line and the column.
    """
    name = display_path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            lines = [(number, row) for number, row in enumerate(reader, start=2) if any(cell.strip() for cell in row)]
    except OSError as error:
        raise MilvusStoreError(f"cannot read the metadata file {name!r}: {error.strerror or error}") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise MilvusStoreError(f"the metadata file {name!r} is not a UTF-8 CSV file ({error})") from None
    if PATH_FIELD not in (header := [column.strip() for column in header or []]):
        raise MilvusStoreError(f"the metadata file {name!r} has no {PATH_FIELD!r} column (the image's path relative to "
                               f"the gallery folder); its columns: {', '.join(header) or 'none'}")
    columns = [column for column in header if column != PATH_FIELD]
    for column in columns:
        if column in OWN_FIELDS or not NAME_PATTERN.fullmatch(column) or header.count(column) > 1:
            raise MilvusStoreError(f"the metadata file {name!r} has a column {column!r} that cannot be a field: names "
                                   f"start with a letter or '_', hold letters, digits and '_', appear once, and are "
                                   f"not {', '.join(OWN_FIELDS)}")
    if types is not None and set(columns) != set(types):
        raise MilvusStoreError(f"the metadata file {name!r} has the columns {', '.join(columns) or 'none'}, the "
                               f"collection the fields {', '.join(types) or 'none'}: give a CSV with exactly those "
                               f"fields, or build into a new collection")
    rows: dict[str, dict[str, str]] = {}
    for number, row in lines:
        if len(row) != len(header):
            raise MilvusStoreError(f"{name} line {number} has {len(row)} cells for {len(header)} columns")
        record = dict(zip(header, (cell.strip() for cell in row)))
        if not (path := record.pop(PATH_FIELD)) or path in rows:
            raise MilvusStoreError(f"{name} line {number}: {f'{path!r} appears twice' if path else 'an empty path'}")
        for column, value in record.items():
            if not value:
                raise MilvusStoreError(f"{name} line {number} ({path}): column {column!r} is empty; every image needs "
                                       f"a value (Milvus fields have no null)")
        rows[path] = record
    if types is None:
        types = {column: _metadata_type([record[column] for record in rows.values()]) for column in columns}
    return dict(types), {path: {column: _typed(record[column], types[column], f"{name} ({path}), column {column!r}")
                                for column in types} for path, record in rows.items()}
