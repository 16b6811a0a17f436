"""Adapters: a source of raw logs in, a validated canonical :class:`LogDataset` out.

* :func:`load_movielens` — MovieLens-100K, either RecBole's atomic files (``ml-100k.inter/.item/.user``, as
  shipped in the ``recbole==1.2.1`` wheel; fetched by :mod:`rec_rllib.data.fetch`) or the original GroupLens
  layout (``u.data``, ``u.item``). Item text is ``"title (year) | genre, genre"``.
* :func:`load_obd` — one campaign of the Open Bandit Dataset sample: the uniform-random and the Bernoulli
  Thompson Sampling logs together, with policy name, position, propensity and context features.
* :func:`load_custom` — the user's own CSV/Parquet logs through a :class:`ColumnMapping`.

Every adapter reads raw columns as text and parses them through one :class:`~rec_rllib.data.validate.Checker`,
so all sources get the same validation and the same error messages.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from rec_rllib.columns import Col
from rec_rllib.data import fetch
from rec_rllib.data.dataset import LogDataset, build_dataset
from rec_rllib.data.validate import Checker, DataValidationError, Problem

log = logging.getLogger(__name__)

GROUPLENS_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
OBD_CAMPAIGNS = ("all", "men", "women")
OBD_POLICIES = ("random", "bts")


@dataclass
class ColumnMapping:
    """Which source column holds each canonical field. ``None`` = the source has no such column."""

    user: str | None = "user_id"
    """User id column (required)."""
    item: str | None = "item_id"
    """Item id column (required)."""
    timestamp: str | None = "timestamp"
    """Integer epoch times or ISO-8601 date-times (required). Date-times become epoch microseconds."""
    reward: str | None = None
    """Rating / click / reward; ``None`` means every logged interaction has reward 1."""
    propensity: str | None = None
    """The logging policy's probability of the shown item, in (0, 1]."""
    position: str | None = None
    """Slot of the item in the shown list."""
    policy: str | None = None
    """Name of the logging policy."""
    context: list[str] = field(default_factory=list)
    """Columns kept as context features (stored as ``ctx_<name>``)."""
    timestamp_unit: str = "s"
    """Unit of integer timestamps (``s``, ``ms``, ``us``); recorded in the manifest."""
    item_id: str = "item_id"
    """Item id column of the items file."""
    item_text: str | None = "text"
    """Item text column of the items file (what the language model reads)."""
    item_features: list[str] = field(default_factory=list)
    """Extra item columns to keep."""

    @classmethod
    def from_yaml(cls, path: str | Path) -> tuple[ColumnMapping, dict[str, Any]]:
        """Read a mapping file: ``columns:`` (field: column), ``items:`` (path/id/text/features), and
        optionally ``interactions:`` (path) and ``timestamp_unit:``. Returns (mapping, extras)."""
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a mapping with keys 'columns', 'items', 'interactions'")
        known = {f.name for f in fields(cls)}
        columns = doc.get("columns", {}) or {}
        unknown = set(columns) - known
        if unknown:
            raise ValueError(
                f"{path}: unknown field(s) {sorted(unknown)} under 'columns'; known: {sorted(known)}"
            )
        kwargs: dict[str, Any] = dict(columns)
        items = doc.get("items", {}) or {}
        for key, attr in (("id", "item_id"), ("text", "item_text"), ("features", "item_features")):
            if key in items:
                kwargs[attr] = items[key]
        if "timestamp_unit" in doc:
            kwargs["timestamp_unit"] = doc["timestamp_unit"]
        extras = {"interactions": doc.get("interactions"), "items": items.get("path")}
        base = path.parent
        for k, v in list(extras.items()):
            if v is not None and not Path(v).is_absolute():
                extras[k] = str(base / v)
        return cls(**kwargs), extras


# -- reading ------------------------------------------------------------------------------------------------
def read_table_as_text(
    path: str | Path,
    *,
    sep: str | None = None,
    header: bool = True,
    names: list[str] | None = None,
    encoding: str = "utf-8",
) -> tuple[pd.DataFrame, int | None]:
    """Read CSV/TSV or Parquet with every column as nullable text; returns (frame, header_lines)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix in (".parquet", ".pq"):
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"{path}: cannot be read as Parquet ({e})") from None
        return frame.astype("string"), None
    if sep is None:
        sep = "\t" if path.suffix in (".tsv", ".inter", ".item", ".user", ".data") else ","
    try:
        frame = pd.read_csv(
            path,
            sep=sep,
            dtype="string",
            keep_default_na=False,
            na_values=[],
            header=0 if header else None,
            names=names,
            encoding=encoding,
            quoting=3 if sep == "\t" else 0,
        )
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"{path}: the file is empty (not even a header line); expected a header naming the columns, "
            "then one line per row"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as {'TSV' if sep == chr(9) else 'CSV'} ({e})") from None
    return frame, (1 if header else 0)


def _validated_interactions(
    raw: pd.DataFrame,
    file: str,
    mapping: ColumnMapping,
    *,
    header_lines: int | None,
    known_items: pd.Index | None,
    row_offset: int = 0,
) -> tuple[pd.DataFrame, str]:
    """Parse and check the mapped columns of one interactions file. Returns (frame, timestamp unit)."""
    check = Checker(file, header_lines=header_lines)
    wanted = {
        "user": mapping.user,
        "item": mapping.item,
        "timestamp": mapping.timestamp,
        "reward": mapping.reward,
        "propensity": mapping.propensity,
        "position": mapping.position,
        "policy": mapping.policy,
    }
    wanted.update({f"context:{c}": c for c in mapping.context})
    check.require_columns(raw, wanted, optional=("reward", "propensity", "position", "policy"))
    check.raise_if_any()
    if len(raw) == 0:
        check.add(
            mapping.user or "user",
            "the file has no data rows",
            "point the loader at a file with interactions",
        )
        check.raise_if_any()

    out = pd.DataFrame(index=raw.index)
    out[Col.USER_ID] = check.ids(raw[mapping.user], mapping.user)
    out[Col.ITEM_ID] = check.ids(raw[mapping.item], mapping.item)
    ts, unit = check.timestamps(raw[mapping.timestamp], mapping.timestamp)
    out[Col.TIMESTAMP] = ts
    out[Col.REWARD] = check.numbers(raw[mapping.reward], mapping.reward) if mapping.reward else 1.0
    if mapping.propensity:
        out[Col.PROPENSITY] = check.propensities(raw[mapping.propensity], mapping.propensity)
    if mapping.position:
        pos = check.numbers(raw[mapping.position], mapping.position)
        frac = np.isfinite(pos.to_numpy()) & (pos.to_numpy() != np.floor(pos.to_numpy()))
        if frac.any():
            check.add(
                mapping.position,
                "position is not a whole number",
                "write integer slots",
                np.flatnonzero(frac),
            )
        out[Col.POSITION] = pos.fillna(0).astype(np.int64)
    if mapping.policy:
        out[Col.POLICY] = raw[mapping.policy].astype(str)
    for c in mapping.context:
        name = Col.CONTEXT_PREFIX + re.sub(r"[^0-9A-Za-z_]", "_", c)
        values = raw[c]
        numeric = pd.to_numeric(values, errors="coerce")
        out[name] = numeric.astype(np.float32) if numeric.notna().all() else values.astype(str)
    if known_items is not None:
        check.unknown(out[Col.ITEM_ID], known_items, mapping.item, "item")
    keys = [Col.USER_ID, Col.ITEM_ID, Col.TIMESTAMP] + ([Col.POSITION] if mapping.position else [])
    check.duplicates(out, keys, mapping.item)
    check.raise_if_any()
    out[Col.SOURCE_ROW] = np.arange(len(out), dtype=np.int64) + row_offset
    return out.reset_index(drop=True), unit or mapping.timestamp_unit


def _validated_items(items: pd.DataFrame, file: str, *, header_lines: int | None) -> pd.DataFrame:
    """Check an items frame with canonical ``item_id`` and ``text`` columns."""
    check = Checker(file, header_lines=header_lines)
    ids = check.ids(items[Col.ITEM_ID], Col.ITEM_ID)
    check.duplicates(items, [Col.ITEM_ID], Col.ITEM_ID)
    text = items[Col.TEXT].astype("string")
    empty = text.isna() | (text.str.strip() == "")
    if empty.any():
        check.add(
            Col.TEXT,
            "empty item text",
            "give every item a text (title, description, categories)",
            np.flatnonzero(empty.to_numpy()),
        )
    check.raise_if_any()
    return items.assign(**{Col.ITEM_ID: ids.astype(str), Col.TEXT: text.astype(str)})


def _file_digest(paths: list[Path]) -> dict[str, str]:
    out = {}
    for p in paths:
        h = hashlib.sha256(Path(p).read_bytes()).hexdigest()
        out[Path(p).name] = "sha256:" + h
    return out


# -- MovieLens-100K ------------------------------------------------------------------------------------------
def movie_text(title: str, year: str | None, genres: list[str]) -> str:
    """``"Toy Story (1995) | Animation, Children's, Comedy"``."""
    title = title.strip()
    head = f"{title} ({year})" if year and not title.endswith(f"({year})") else title
    return f"{head} | {', '.join(genres)}" if genres else head


def load_movielens(directory: str | Path | None = None, **build_kwargs: Any) -> LogDataset:
    """MovieLens-100K from RecBole's atomic files or the GroupLens layout; fetched through pip if no path."""
    if directory is None:
        directory = fetch.ml100k_dir()
        requirement = fetch.ML100K.requirement
    else:
        requirement = None
    directory = Path(directory)
    if (directory / "ml-100k.inter").exists():
        return _movielens_recbole(directory, requirement, **build_kwargs)
    if (directory / "u.data").exists():
        return _movielens_grouplens(directory, **build_kwargs)
    raise FileNotFoundError(
        f"{directory}: neither RecBole's ml-100k.inter nor GroupLens's u.data is there; "
        "give the directory of an unpacked ml-100k, or no path to fetch it"
    )


def _movielens_recbole(directory: Path, requirement: str | None, **build_kwargs: Any) -> LogDataset:
    item_file = directory / "ml-100k.item"
    raw_items, item_header = read_table_as_text(item_file)
    item_cols = {"item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"}
    check = Checker(str(item_file), header_lines=item_header)
    check.require_columns(raw_items, {c: c for c in sorted(item_cols)})
    check.raise_if_any()
    genres = [str(g).split() for g in raw_items["class:token_seq"]]
    items = pd.DataFrame(
        {
            Col.ITEM_ID: raw_items["item_id:token"],
            Col.TEXT: [
                movie_text(str(t), str(y) if y else None, g)
                for t, y, g in zip(
                    raw_items["movie_title:token_seq"], raw_items["release_year:token"], genres, strict=True
                )
            ],
            Col.GENRES: genres,
            "year": pd.to_numeric(raw_items["release_year:token"], errors="coerce").astype("Int16"),
        }
    )
    items = _validated_items(items, str(item_file), header_lines=item_header)

    inter_file = directory / "ml-100k.inter"
    raw, header = read_table_as_text(inter_file)
    mapping = ColumnMapping(
        user="user_id:token",
        item="item_id:token",
        timestamp="timestamp:float",
        reward="rating:float",
        timestamp_unit="s",
    )
    inter, unit = _validated_interactions(
        raw, str(inter_file), mapping, header_lines=header, known_items=pd.Index(items[Col.ITEM_ID])
    )
    users = None
    files = [inter_file, item_file]
    user_file = directory / "ml-100k.user"
    if user_file.exists():
        raw_users, _ = read_table_as_text(user_file)
        users = raw_users.rename(columns=lambda c: c.split(":")[0])
        files.append(user_file)
    source = {"kind": "movielens-100k/recbole-atomic", "path": str(directory), "files": _file_digest(files)}
    if requirement:
        source["requirement"] = requirement
    return build_dataset(
        inter, items, users=users, name="ml-100k", source=source, timestamp_unit=unit, **build_kwargs
    )


def _movielens_grouplens(directory: Path, **build_kwargs: Any) -> LogDataset:
    item_file = directory / "u.item"
    names = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *GROUPLENS_GENRES]
    raw_items, item_header = read_table_as_text(
        item_file, sep="|", header=False, names=names, encoding="latin-1"
    )
    genre_flags = raw_items[GROUPLENS_GENRES].astype("string").fillna("0") == "1"
    genres = [
        [g for g, on in zip(GROUPLENS_GENRES, row, strict=True) if on] for row in genre_flags.to_numpy()
    ]
    years = []
    for title, date in zip(raw_items["title"].fillna(""), raw_items["release_date"].fillna(""), strict=True):
        m = re.search(r"\((\d{4})\)\s*$", str(title))
        years.append(m.group(1) if m else (str(date)[-4:] if str(date)[-4:].isdigit() else None))
    items = pd.DataFrame(
        {
            Col.ITEM_ID: raw_items["item_id"],
            Col.TEXT: [
                movie_text(str(t), y, g)
                for t, y, g in zip(raw_items["title"].fillna(""), years, genres, strict=True)
            ],
            Col.GENRES: genres,
            "year": pd.to_numeric(pd.Series(years, dtype="string"), errors="coerce").astype("Int16"),
        }
    )
    items = _validated_items(items, str(item_file), header_lines=item_header)
    inter_file = directory / "u.data"
    raw, header = read_table_as_text(
        inter_file, sep="\t", header=False, names=["user", "item", "rating", "timestamp"]
    )
    mapping = ColumnMapping(
        user="user", item="item", timestamp="timestamp", reward="rating", timestamp_unit="s"
    )
    inter, unit = _validated_interactions(
        raw, str(inter_file), mapping, header_lines=header, known_items=pd.Index(items[Col.ITEM_ID])
    )
    source = {
        "kind": "movielens-100k/grouplens",
        "path": str(directory),
        "files": _file_digest([inter_file, item_file]),
    }
    return build_dataset(inter, items, name="ml-100k", source=source, timestamp_unit=unit, **build_kwargs)


# -- Open Bandit Dataset -------------------------------------------------------------------------------------
def obd_item_text(row: pd.Series, feature_cols: list[str]) -> str:
    """OBD items carry no text: describe an item by its (hashed) features so the text encoder sees them."""
    parts = [f"item {row[Col.ITEM_ID]}"]
    for c in feature_cols:
        v = row[c]
        parts.append(f"{c} {float(v):.3f}" if isinstance(v, float) else f"{c} {str(v)[:8]}")
    return " | ".join(parts)


def load_obd(
    directory: str | Path | None = None,
    *,
    campaign: str = "all",
    policies: tuple[str, ...] = OBD_POLICIES,
    **build_kwargs: Any,
) -> LogDataset:
    """One campaign of the Open Bandit Dataset sample, logs of ``policies`` together (column ``policy``).

    Users are anonymous in OBD: the user id is a digest of the four hashed user features (a context
    segment). Item features come from the first policy's ``item_context.csv`` (the two logs hash the
    categorical features with different salts; the numeric feature is identical).
    """
    if campaign not in OBD_CAMPAIGNS:
        raise ValueError(f"unknown OBD campaign {campaign!r}; expected one of {OBD_CAMPAIGNS}")
    unknown = set(policies) - set(OBD_POLICIES)
    if unknown or not policies:
        raise ValueError(
            f"unknown OBD policies {sorted(unknown) or policies!r}; expected a subset of {OBD_POLICIES}"
        )
    requirement = None
    if directory is None:
        directory = fetch.obd_dir()
        requirement = fetch.OBD.requirement
    directory = Path(directory)

    item_file = directory / policies[0] / campaign / "item_context.csv"
    raw_items, item_header = read_table_as_text(item_file)
    raw_items = raw_items.drop(columns=[c for c in raw_items.columns if c == "" or c.startswith("Unnamed")])
    feature_cols = [c for c in raw_items.columns if c.startswith("item_feature_")]
    items = raw_items.rename(columns={"item_id": Col.ITEM_ID})
    for c in feature_cols:
        as_num = pd.to_numeric(items[c], errors="coerce")
        if as_num.notna().all():
            items[c] = as_num.astype(float)
    items[Col.TEXT] = [obd_item_text(r, feature_cols) for _, r in items.iterrows()]
    items = _validated_items(items, str(item_file), header_lines=item_header)

    frames, files, offset, unit = [], [item_file], 0, "us"
    for policy in policies:
        path = directory / policy / campaign / f"{campaign}.csv"
        raw, header = read_table_as_text(path)
        raw = raw.drop(columns=[c for c in raw.columns if c == "" or c.startswith("Unnamed")])
        user_cols = [c for c in raw.columns if c.startswith("user_feature_")]
        affinity = [c for c in raw.columns if c.startswith("user-item_affinity_")]
        raw["_segment"] = [
            hashlib.sha1("|".join(vals).encode()).hexdigest()[:12]
            for vals in raw[user_cols].astype(str).itertuples(index=False, name=None)
        ]
        raw["_policy"] = policy
        mapping = ColumnMapping(
            user="_segment",
            item="item_id",
            timestamp="timestamp",
            reward="click",
            propensity="propensity_score",
            position="position",
            policy="_policy",
            context=user_cols + affinity,
        )
        inter, unit = _validated_interactions(
            raw,
            str(path),
            mapping,
            header_lines=header,
            known_items=pd.Index(items[Col.ITEM_ID]),
            row_offset=offset,
        )
        frames.append(inter)
        files.append(path)
        offset += len(raw)
    source = {
        "kind": "open-bandit-dataset",
        "campaign": campaign,
        "policies": list(policies),
        "path": str(directory),
        "files": _file_digest(files),
    }
    if requirement:
        source["requirement"] = requirement
    return build_dataset(
        pd.concat(frames, ignore_index=True),
        items,
        name=f"obd-{campaign}",
        source=source,
        timestamp_unit=unit,
        **build_kwargs,
    )


# -- the user's own logs -------------------------------------------------------------------------------------
def load_custom(
    interactions: str | Path,
    mapping: ColumnMapping,
    *,
    items: str | Path | None = None,
    name: str | None = None,
    **build_kwargs: Any,
) -> LogDataset:
    """The user's own CSV/Parquet logs. Without an items file, items are the logged ids with text
    ``"item <id>"``."""
    interactions = Path(interactions)
    raw, header = read_table_as_text(interactions)
    files = [interactions]
    if items is not None:
        items = Path(items)
        raw_items, item_header = read_table_as_text(items)
        check = Checker(str(items), header_lines=item_header)
        wanted = {"item_id": mapping.item_id, "item_text": mapping.item_text}
        wanted.update({f"feature:{c}": c for c in mapping.item_features})
        check.require_columns(raw_items, wanted)
        check.raise_if_any()
        item_frame = raw_items[[mapping.item_id, mapping.item_text, *mapping.item_features]].rename(
            columns={mapping.item_id: Col.ITEM_ID, mapping.item_text: Col.TEXT}
        )
        item_frame = _validated_items(item_frame, str(items), header_lines=item_header)
        known = pd.Index(item_frame[Col.ITEM_ID])
        files.append(items)
    else:
        item_frame, known = None, None
    inter, unit = _validated_interactions(
        raw, str(interactions), mapping, header_lines=header, known_items=known
    )
    if item_frame is None:
        log.warning(
            "%s: no items file given; item text falls back to 'item <id>', which carries no meaning "
            "for the language model. Pass an items file with real text.",
            interactions,
        )
        ids = pd.unique(inter[Col.ITEM_ID])
        item_frame = pd.DataFrame({Col.ITEM_ID: ids, Col.TEXT: [f"item {i}" for i in ids]})
    source = {
        "kind": "custom",
        "path": str(interactions),
        "mapping": mapping.__dict__,
        "files": _file_digest(files),
    }
    return build_dataset(
        inter, item_frame, name=name or interactions.stem, source=source, timestamp_unit=unit, **build_kwargs
    )


def load_feedback(
    feedback_dir: str | Path, base: str | Path, *, name: str | None = None, **build_kwargs: Any
) -> LogDataset:
    """A new round's dataset: the ``base`` dataset's logs plus the serving feedback log (closing the loop).

    Each feedback row becomes an interaction of its user (anonymous feedback: user ``anon-<request id>``)
    with the clicked item, its reward, the propensity and position it was shown with, and the logging
    policy ``<strategy>@<model version>``. Items added at serving time enter the items table with the
    text they were added with. Timestamps are converted to the base dataset's unit.
    """
    from rec_rllib.data.feedback import feedback_parts, read_feedback

    fb = read_feedback(feedback_dir).to_pandas()
    source = {"feedback_dir": str(feedback_dir), "files": _file_digest(feedback_parts(feedback_dir))}
    return feedback_dataset(fb, base, name=name, source=source, **build_kwargs)


def _leading_history(
    fb: pd.DataFrame, user: pd.Series, base_users: set, catalogue: set, per_ms: float, first_row: int
) -> pd.DataFrame:
    """For each user of ``fb`` not in the base log, the catalogue items of the history logged with their
    first event, as interactions one time unit apart ending one unit before that event."""
    rows: list[tuple[str, str, int]] = []
    order = np.argsort(fb["timestamp_ms"].to_numpy(), kind="stable")
    seen: set[str] = set()
    for i in order:
        u = str(user.iloc[i])
        if u in base_users or u in seen:
            continue
        seen.add(u)
        start = int(int(fb["timestamp_ms"].iloc[i]) * per_ms)
        history = [str(item) for item in fb["history"].iloc[i] if str(item) in catalogue]
        rows += [(u, item, start - len(history) + j) for j, item in enumerate(history)]
    return pd.DataFrame(
        {
            Col.USER_ID: [r[0] for r in rows],
            Col.ITEM_ID: [r[1] for r in rows],
            Col.TIMESTAMP: np.array([r[2] for r in rows], dtype=np.int64),
            Col.REWARD: np.ones(len(rows), dtype=np.float32),
            Col.SOURCE_ROW: first_row + np.arange(len(rows)),
            Col.PROPENSITY: np.full(len(rows), np.nan),
            Col.POSITION: np.full(len(rows), -1, dtype=np.int16),
            Col.POLICY: ["history"] * len(rows),
        }
    )


def feedback_dataset(
    fb: pd.DataFrame,
    base: str | Path,
    *,
    name: str | None = None,
    source: dict[str, Any] | None = None,
    **build_kwargs: Any,
) -> LogDataset:
    """:func:`load_feedback` of feedback rows already read (:data:`rec_rllib.data.feedback.SCHEMA`, e.g. the
    part of a log one round of the closed loop trains on); ``source`` joins the dataset's provenance.

    A user the base log does not know (a live user whose client sent their history) starts with the
    history the policy saw at their first event, as interactions just before it (policy ``history``,
    reward 1): their sequence is their past and their clicks, not the clicks alone."""
    base_ds = LogDataset.load(str(base))
    feedback_dir = (source or {}).get("feedback_dir", "feedback rows")
    unit = base_ds.manifest.get("timestamp_unit", "s")
    per_ms = {"s": 1e-3, "ms": 1.0, "us": 1e3}[unit]
    items_ix = base_ds.items[Col.ITEM_ID].astype(str)
    users_ix = base_ds.users[Col.USER_ID].astype(str).to_numpy()
    inter = base_ds.interactions
    old = pd.DataFrame(
        {
            Col.USER_ID: users_ix[inter[Col.USER_IDX].to_numpy()],
            Col.ITEM_ID: items_ix.to_numpy()[inter[Col.ITEM_IDX].to_numpy()],
            Col.TIMESTAMP: inter[Col.TIMESTAMP].to_numpy(),
            Col.REWARD: inter[Col.REWARD].to_numpy(),
            Col.SOURCE_ROW: inter[Col.SOURCE_ROW].to_numpy(),
            Col.PROPENSITY: inter[Col.PROPENSITY].to_numpy() if Col.PROPENSITY in inter else np.nan,
            Col.POSITION: inter[Col.POSITION].to_numpy() if Col.POSITION in inter else -1,
            Col.POLICY: inter[Col.POLICY].to_numpy() if Col.POLICY in inter else "logged",
        }
    )
    user = fb["user_id"].where(fb["user_id"].notna() & (fb["user_id"] != ""), "anon-" + fb["request_id"])
    new = pd.DataFrame(
        {
            Col.USER_ID: user.astype(str).to_numpy(),
            Col.ITEM_ID: fb["item_id"].astype(str).to_numpy(),
            Col.TIMESTAMP: (fb["timestamp_ms"].astype(np.int64) * per_ms).astype(np.int64).to_numpy(),
            Col.REWARD: fb["reward"].astype(np.float32).to_numpy(),
            Col.SOURCE_ROW: int(old[Col.SOURCE_ROW].max()) + 1 + np.arange(len(fb)),
            Col.PROPENSITY: fb["propensity"].astype(np.float64).to_numpy(),
            Col.POSITION: fb["position"].astype(np.int16).to_numpy(),
            Col.POLICY: (fb["strategy"].astype(str) + "@" + fb["model_version"].astype(str)).to_numpy(),
        }
    )
    bad = ~np.isfinite(new[Col.PROPENSITY]) | (new[Col.PROPENSITY] <= 0) | (new[Col.PROPENSITY] > 1)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataValidationError(
            [
                Problem(
                    file=str(feedback_dir),
                    field="propensity",
                    message=f"propensity {new[Col.PROPENSITY].iloc[row]!r} not in (0, 1]",
                    fix="feedback rows come from the serving app; do not edit them",
                    rows=[row],
                    n_rows=int(bad.sum()),
                    header_lines=None,
                )
            ]
        )
    first_row = int(old[Col.SOURCE_ROW].max()) + 1 + len(fb)
    lead = _leading_history(fb, user, set(users_ix), set(items_ix), per_ms, first_row)
    items = base_ds.items[[Col.ITEM_ID, Col.TEXT]].assign(**{Col.ITEM_ID: items_ix})
    added = fb.loc[~fb["item_id"].astype(str).isin(set(items_ix)), ["item_id", "item_text"]].drop_duplicates(
        "item_id"
    )
    if len(added):
        items = pd.concat(
            [items, added.rename(columns={"item_id": Col.ITEM_ID, "item_text": Col.TEXT})], ignore_index=True
        )
    source = {
        "kind": "feedback",
        "base": str(base),
        "base_content_hash": base_ds.manifest.get("content_hash"),
        "feedback_rows": len(fb),
        **(source or {}),
    }
    return build_dataset(
        pd.concat([old, lead, new], ignore_index=True),
        items,
        name=name or f"{base_ds.name}+feedback",
        source=source,
        timestamp_unit=unit,
        **build_kwargs,
    )
