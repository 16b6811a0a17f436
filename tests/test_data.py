"""Loaders on the real data: MovieLens-100K (RecBole and GroupLens layouts), Open Bandit, own logs; round
trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rec_rllib.columns import Col
from rec_rllib.data import ColumnMapping, LogDataset, load_custom, load_movielens
from rec_rllib.data.sources import GROUPLENS_GENRES


def test_movielens_counts_and_text(ml100k: LogDataset):
    c = ml100k.manifest["counts"]
    assert (c["interactions"], c["users"], c["items"]) == (100_000, 943, 1682)
    text = dict(zip(ml100k.items[Col.ITEM_ID], ml100k.items[Col.TEXT], strict=True))
    assert text["1"] == "Toy Story (1995) | Animation, Children's, Comedy"
    assert ml100k.interactions[Col.REWARD].between(1, 5).all()
    assert ml100k.manifest["source"]["requirement"] == "recbole==1.2.1"
    assert ml100k.manifest["timestamp_unit"] == "s"
    # sorted by (user, timestamp, source row)
    inter = ml100k.interactions
    keys = list(zip(inter[Col.USER_IDX], inter[Col.TIMESTAMP], inter[Col.SOURCE_ROW], strict=True))
    assert keys == sorted(keys)


def test_save_load_round_trip(ml100k: LogDataset, tmp_path: Path):
    path = ml100k.save(str(tmp_path / "ml"))
    back = LogDataset.load(path)
    pd.testing.assert_frame_equal(back.interactions, ml100k.interactions)
    pd.testing.assert_frame_equal(
        back.items.drop(columns=[Col.GENRES]), ml100k.items.drop(columns=[Col.GENRES])
    )
    assert [list(g) for g in back.items[Col.GENRES]] == [list(g) for g in ml100k.items[Col.GENRES]]
    pd.testing.assert_frame_equal(back.users, ml100k.users)
    assert back.manifest == json.loads(json.dumps(ml100k.manifest))
    assert sorted(p.name for p in Path(path).iterdir()) == [
        "interactions.parquet",
        "items.parquet",
        "manifest.json",
        "users.parquet",
    ]


def test_failed_save_keeps_the_previous_dataset(ml100k: LogDataset, tmp_path: Path):
    path = ml100k.save(str(tmp_path / "ml"))
    broken = LogDataset(ml100k.interactions, ml100k.items, ml100k.users, {"not": {"serialisable": object()}})
    with pytest.raises(TypeError):
        broken.save(path)
    assert LogDataset.load(path).manifest["content_hash"] == ml100k.manifest["content_hash"]
    assert [p.name for p in tmp_path.iterdir()] == ["ml"]  # no temp directory left behind


def test_grouplens_layout_gives_the_same_dataset(ml100k: LogDataset, ml100k_dir: Path, tmp_path: Path):
    """Write the real data in the original GroupLens layout (u.data, u.item) and load it back."""
    inter = pd.read_csv(ml100k_dir / "ml-100k.inter", sep="\t")
    inter.to_csv(tmp_path / "u.data", sep="\t", header=False, index=False)
    items = pd.read_csv(ml100k_dir / "ml-100k.item", sep="\t", quoting=3, dtype=str, keep_default_na=False)
    rows = []
    for _, r in items.iterrows():
        genres = r["class:token_seq"].split()
        flags = ["1" if g in genres else "0" for g in GROUPLENS_GENRES]
        title = f"{r['movie_title:token_seq']} ({r['release_year:token']})"
        rows.append(
            "|".join([r["item_id:token"], title, f"01-Jan-{r['release_year:token']}", "", "http://x", *flags])
        )
    (tmp_path / "u.item").write_text("\n".join(rows) + "\n", encoding="latin-1", errors="replace")
    gl = load_movielens(tmp_path)
    cols = [Col.USER_IDX, Col.ITEM_IDX, Col.TIMESTAMP, Col.REWARD, Col.SPLIT_LOO, Col.SPLIT_TEMPORAL]
    pd.testing.assert_frame_equal(gl.interactions[cols], ml100k.interactions[cols])
    same_text = (gl.items[Col.TEXT] == ml100k.items[Col.TEXT]).mean()
    assert same_text > 0.99  # titles outside latin-1 are the only difference


def test_obd_keeps_policy_position_propensity_and_context(obd_all: LogDataset):
    inter = obd_all.interactions
    assert len(inter) == 20_000 and obd_all.n_items == 80
    assert sorted(inter[Col.POLICY].unique()) == ["bts", "random"]
    assert (inter[Col.POLICY] == "random").sum() == 10_000
    assert sorted(inter[Col.POSITION].unique()) == [1, 2, 3]
    assert inter[Col.PROPENSITY].between(0, 1, inclusive="right").all()
    random = inter[inter[Col.POLICY] == "random"]
    np.testing.assert_allclose(random[Col.PROPENSITY], 1 / 80)  # uniform logging policy over 80 items
    assert set(inter[Col.REWARD].unique()) <= {0.0, 1.0}
    ctx = [c for c in inter.columns if c.startswith(Col.CONTEXT_PREFIX)]
    assert (
        len([c for c in ctx if "affinity" in c]) == 80 and len([c for c in ctx if "user_feature" in c]) == 4
    )
    assert obd_all.manifest["timestamp_unit"] == "us"


def _custom_logs(ml100k_dir: Path, tmp_path: Path, n: int = 2000) -> tuple[Path, Path]:
    inter = pd.read_csv(ml100k_dir / "ml-100k.inter", sep="\t").head(n)
    inter.columns = ["uid", "iid", "stars", "when"]
    inter["when"] = pd.to_datetime(inter["when"], unit="s", utc=True).astype(str)
    inter.to_csv(tmp_path / "logs.csv", index=False)
    items = pd.read_csv(ml100k_dir / "ml-100k.item", sep="\t", quoting=3)
    items = items.rename(columns={"item_id:token": "iid", "movie_title:token_seq": "title"})[["iid", "title"]]
    items.to_parquet(tmp_path / "items.parquet")
    return tmp_path / "logs.csv", tmp_path / "items.parquet"


def test_custom_logs_with_yaml_mapping(ml100k_dir: Path, tmp_path: Path):
    logs, items = _custom_logs(ml100k_dir, tmp_path)
    (tmp_path / "map.yaml").write_text(
        "interactions: logs.csv\ncolumns: {user: uid, item: iid, timestamp: when, reward: stars}\n"
        "items: {path: items.parquet, id: iid, text: title}\n"
    )
    mapping, extras = ColumnMapping.from_yaml(tmp_path / "map.yaml")
    ds = load_custom(extras["interactions"], mapping, items=extras["items"], name="mine")
    assert len(ds.interactions) == 2000 and ds.n_items == 1682
    assert ds.manifest["timestamp_unit"] == "us"  # date-time strings become epoch microseconds
    ref = pd.read_csv(ml100k_dir / "ml-100k.inter", sep="\t").head(2000)
    assert sorted(ds.interactions[Col.TIMESTAMP] // 1_000_000) == sorted(ref["timestamp:float"].astype(int))


def test_unknown_mapping_field_is_rejected(tmp_path: Path):
    (tmp_path / "map.yaml").write_text("columns: {usr: uid}\n")
    with pytest.raises(ValueError, match="unknown field.*usr"):
        ColumnMapping.from_yaml(tmp_path / "map.yaml")
