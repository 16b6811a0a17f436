"""Every validation error on a malformed file names the file, the row/line and the field, and says how to fix
it.

The malformed files are real MovieLens-100K rows with one defect injected each.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from rec_rllib.data import ColumnMapping, DataValidationError, LogDataset, load_custom

MAPPING = ColumnMapping(
    user="user",
    item="item",
    timestamp="ts",
    reward="rating",
    propensity="p",
    item_id="item",
    item_text="text",
)


@pytest.fixture
def real_rows(ml100k_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    inter = pd.read_csv(ml100k_dir / "ml-100k.inter", sep="\t", dtype=str).head(50)
    inter.columns = ["user", "item", "rating", "ts"]
    inter["p"] = "0.5"
    items = pd.read_csv(ml100k_dir / "ml-100k.item", sep="\t", quoting=3, dtype=str)
    items = items.rename(columns={"item_id:token": "item", "movie_title:token_seq": "text"})[["item", "text"]]
    return inter, items


def _load(
    tmp_path: Path, inter: pd.DataFrame, items: pd.DataFrame, mapping: ColumnMapping = MAPPING
) -> LogDataset:
    inter.to_csv(tmp_path / "logs.csv", index=False)
    items.to_csv(tmp_path / "items.csv", index=False)
    return load_custom(tmp_path / "logs.csv", mapping, items=tmp_path / "items.csv")


def _expect(
    tmp_path, inter, items, *, field: str, row: int | None, pattern: str, file: str = "logs.csv", **kw
):
    with pytest.raises(DataValidationError) as info:
        _load(tmp_path, inter, items, **kw)
    problems = [p for p in info.value.problems if p.field == field]
    assert problems, f"no problem reported for field {field!r}: {info.value}"
    p = problems[0]
    text = str(info.value)
    assert p.file.endswith(file) and file in text
    assert re.search(pattern, p.message), p.message
    assert "Fix:" in text
    if row is not None:
        assert row in p.rows
        assert f"row {row} (line {row + 2})" in text  # header is line 1
    return info.value


def test_clean_rows_load(tmp_path, real_rows):
    ds = _load(tmp_path, *real_rows)
    assert len(ds.interactions) == 50


def test_missing_column(tmp_path, real_rows):
    inter, items = real_rows
    _expect(tmp_path, inter.drop(columns=["ts"]), items, field="ts", row=None, pattern="column missing")


def test_mistyped_column(tmp_path, real_rows):
    inter, items = real_rows
    inter.loc[7, "rating"] = "five"
    _expect(tmp_path, inter, items, field="rating", row=7, pattern="not a number.*five")


@pytest.mark.parametrize("bad", ["", "NaN"])
def test_nan_timestamp(tmp_path, real_rows, bad):
    inter, items = real_rows
    inter.loc[3, "ts"] = bad
    _expect(tmp_path, inter, items, field="ts", row=3, pattern="missing or NaN timestamp")


def test_negative_timestamp(tmp_path, real_rows):
    inter, items = real_rows
    inter.loc[11, "ts"] = "-5"
    _expect(tmp_path, inter, items, field="ts", row=11, pattern="negative timestamp")


def test_unknown_item(tmp_path, real_rows):
    inter, items = real_rows
    inter.loc[20, "item"] = "999999"
    _expect(tmp_path, inter, items, field="item", row=20, pattern="absent from the items file.*999999")


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.2"])
def test_propensity_outside_unit_interval(tmp_path, real_rows, bad):
    inter, items = real_rows
    inter.loc[9, "p"] = bad
    _expect(tmp_path, inter, items, field="p", row=9, pattern=r"outside \(0, 1\]")


def test_duplicate_rows(tmp_path, real_rows):
    inter, items = real_rows
    inter = pd.concat([inter, inter.iloc[[4]]], ignore_index=True)
    err = _expect(tmp_path, inter, items, field="item", row=50, pattern="repeat the same")
    assert 4 in [p for p in err.problems if "repeat" in p.message][0].rows


def test_empty_user(tmp_path, real_rows):
    inter, items = real_rows
    inter.loc[2, "user"] = "  "
    _expect(tmp_path, inter, items, field="user", row=2, pattern="empty id")


@pytest.mark.parametrize("empty", ["logs.csv", "items.csv"])
def test_an_empty_file_is_named_with_what_it_should_hold(tmp_path, real_rows, empty):
    """A file without even a header line (pandas alone says "No columns to parse from file")."""
    inter, items = real_rows
    inter.to_csv(tmp_path / "logs.csv", index=False)
    items.to_csv(tmp_path / "items.csv", index=False)
    (tmp_path / empty).write_text("")
    with pytest.raises(ValueError) as info:
        load_custom(tmp_path / "logs.csv", MAPPING, items=tmp_path / "items.csv")
    text = str(info.value)
    assert text.startswith(str(tmp_path / empty)), text
    assert "the file is empty" in text and "expected a header naming the columns" in text


def test_empty_item_text_names_the_items_file(tmp_path, real_rows):
    inter, items = real_rows
    items.loc[5, "text"] = ""
    _expect(tmp_path, inter, items, field="text", row=5, pattern="empty item text", file="items.csv")


def test_all_problems_are_reported_at_once(tmp_path, real_rows):
    inter, items = real_rows
    inter.loc[1, "rating"] = "x"
    inter.loc[2, "ts"] = "-1"
    inter.loc[3, "p"] = "2"
    with pytest.raises(DataValidationError) as info:
        _load(tmp_path, inter, items)
    assert {p.field for p in info.value.problems} >= {"rating", "ts", "p"}


def test_parquet_rows_have_no_line_numbers(tmp_path, real_rows):
    inter, items = real_rows
    inter.loc[6, "ts"] = "-3"
    inter.to_parquet(tmp_path / "logs.parquet")
    items.to_csv(tmp_path / "items.csv", index=False)
    with pytest.raises(DataValidationError) as info:
        load_custom(tmp_path / "logs.parquet", MAPPING, items=tmp_path / "items.csv")
    assert "logs.parquet, row 6, field 'ts'" in str(info.value)


def test_feedback_part_missing_a_column_is_named(tmp_path):
    """A feedback part without a column fails naming the part file and the column; nothing is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rec_rllib.data.feedback import SCHEMA, read_feedback

    row = {name: None for name in SCHEMA.names} | {"request_id": "r1", "item_id": "50", "reward": 1.0}
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), tmp_path / "part-1.parquet")
    assert read_feedback(tmp_path).num_rows == 1
    pq.write_table(
        pa.Table.from_pylist([row], schema=SCHEMA).drop_columns(["propensity"]), tmp_path / "part-2.parquet"
    )
    with pytest.raises(DataValidationError) as err:
        read_feedback(tmp_path)
    assert "part-2.parquet" in str(err.value) and "propensity" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-1.parquet", "part-2.parquet"]
