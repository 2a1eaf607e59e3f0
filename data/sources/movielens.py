"""MovieLens-100K as a ranking data set with per-event-type user histories.

Data (GroupLens licence: no redistribution, non-commercial; cite Harper & Konstan 2015).
It is never committed: :func:`ensure_movielens` fetches the ``recbole==1.2.1`` wheel from
the package index (it ships the files), checks its sha256 and unpacks only the three
MovieLens files into the cache. A GroupLens ``ml-100k/`` folder (``u.data``, ``u.user``,
``u.item``) is accepted as well through ``data.movielens.path``.

Examples: one per rating. Labels (``data.movielens.labels``, in that order; default
``[like]``): ``like`` = ``rating >= like_threshold`` (binary), ``love`` = ``rating == 5``
(binary), ``rating`` = the raw rating 1..5 as a float (regression). Per user, events are
ordered by (timestamp, file order); the last 10 are **test**, the 10 before **eval**
(validation), the rest **train**. An example's history holds only the user's events
with a timestamp *strictly earlier* than its own (same-second ratings are not history,
so nothing leaks from the same session), split into two event types:
``like`` (rating >= threshold) and ``dislike``; each event has item id, action = the
rating, and timestamp. Context: user id, target item, age bucket, gender, occupation,
zip region, genres (multi-valued), release-decade, hour of day, weekday.
Dense: the user's log(1 + #history), mean history rating / 5 and share of likes; years
since release; then the standardised statistics of ``movielens_history`` (user and item
rates, recent windows, genre affinity, residuals), all from ratings *strictly earlier* than
the example, by any user for the item's.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from kunlun.common import default_cache_dir
from kunlun.data.block import EventColumns, ExampleBlock, Jagged, gather_jagged, ranges
from kunlun.data.config import MOVIELENS_LABELS
from kunlun.data.errors import BadRowTracker, DataError
from kunlun.data.schema import ContextFeature, EventType, FeatureSchema, TableSpec
from kunlun.data.sources.movielens_history import HISTORY_FEATURES, genre_matrix, history_features

log = logging.getLogger(__name__)

RECBOLE_WHEEL = "recbole==1.2.1"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
_MEMBERS = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
HOLDOUT = 10  # events per user in each of test and eval
_AGE_BUCKETS = np.array([18, 25, 35, 45, 50, 56])
_MAX_GENRES = 19


def ensure_movielens(cache_dir: Path) -> Path:
    """Folder with the RecBole-format ML-100K files, downloading them on first use.

    Safe to call from several processes at once (file lock); the folder appears only
    when complete (unpacked into a temporary folder, then renamed).
    """
    target = cache_dir / "ml-100k"
    if all((target / m).is_file() for m in _MEMBERS):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".ml-100k.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((target / m).is_file() for m in _MEMBERS):
            return target
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", tmp, RECBOLE_WHEEL]
            log.info("downloading MovieLens-100K (inside the %s wheel) into %s", RECBOLE_WHEEL, target)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("recbole-*.whl"))
            if proc.returncode != 0 or not wheels:
                raise DataError(
                    f"could not fetch MovieLens-100K: `{' '.join(cmd)}` failed ({proc.stderr.strip()[-500:]}). "
                    "Set data.movielens.path to a folder with the GroupLens ml-100k files instead."
                )
            digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
            if digest != RECBOLE_SHA256:
                raise DataError(f"{wheels[0].name}: sha256 {digest} != expected {RECBOLE_SHA256}; refusing to use it")
            staging = Path(tmp) / "ml-100k"
            staging.mkdir()
            with zipfile.ZipFile(wheels[0]) as zf:
                for m in _MEMBERS:
                    with zf.open(f"recbole/dataset_example/ml-100k/{m}") as src, open(staging / m, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)
    return target


# ------------------------------------------------------------------------ parsing
@dataclass
class _Raw:
    users: np.ndarray  # ratings, in file order
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    user_attr: Dict[int, Tuple[int, str, str, str]]  # id → age, gender, occupation, zip
    item_attr: Dict[int, Tuple[int, List[str]]]  # id → release year (0 = unknown), genres


MAX_ID = 10**7  # MovieLens ids are small dense integers; tables are sized by the largest id
MAX_TIMESTAMP = 10**10 - 1  # seconds; the (user, time) sort key packs both into one int64


def _int(tracker: BadRowTracker, path, line: int, name: str, text: str, lo: int = 0, hi: Optional[int] = None) -> Optional[int]:
    try:
        v = int(text)  # exact for plain integers of any length
    except ValueError:
        try:  # RecBole writes ratings and timestamps as floats ("3.0")
            f = float(text)
            v = int(f)
            if f != v:
                raise ValueError
        except (ValueError, OverflowError):  # OverflowError: 'inf', '1e999'
            tracker.bad(path, line, name, text[:40], "an integer")
            return None
    if v < lo or (hi is not None and v > hi):
        tracker.bad(path, line, name, text, f"an integer in [{lo}, {hi if hi is not None else 'inf'}]")
        return None
    return v


def _read_lines(path: Path, encoding: str = "utf-8"):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, encoding=encoding, errors="replace") as f:
        for n, raw in enumerate(f, start=1):
            line = raw.rstrip("\n").rstrip("\r")
            if line:
                yield n, line


def _parse_ratings(path: Path, sep: str, header: bool, tracker: BadRowTracker):
    cols: List[List[int]] = [[], [], [], []]
    names = ("user_id", "item_id", "rating", "timestamp")
    bounds = ((1, MAX_ID), (1, MAX_ID), (1, 5), (0, MAX_TIMESTAMP))
    for line_no, line in _read_lines(path):
        if header and line_no == 1:
            continue
        fields = line.split(sep)
        if len(fields) != 4:
            tracker.bad(path, line_no, "row", line[:80], f"4 fields separated by {sep!r}, got {len(fields)}")
            continue
        vals = []
        for nm, fv, (lo, hi) in zip(names, fields, bounds):
            v = _int(tracker, path, line_no, nm, fv.strip(), lo, hi)
            if v is None:  # one bad field makes one bad row: report and count it once
                break
            vals.append(v)
        if len(vals) != len(names):
            continue
        for c, v in zip(cols, vals):
            c.append(v)
    if not cols[0]:
        raise DataError(f"{path}: no valid ratings")
    return [np.asarray(c, dtype=np.int64) for c in cols]


def _parse_users(path: Path, sep: str, header: bool, tracker: BadRowTracker) -> Dict[int, Tuple[int, str, str, str]]:
    out = {}
    for line_no, line in _read_lines(path):
        if header and line_no == 1:
            continue
        fields = line.split(sep)
        if len(fields) != 5:
            tracker.bad(path, line_no, "row", line[:80], f"5 fields (id, age, gender, occupation, zip) separated by {sep!r}, got {len(fields)}")
            continue
        uid = _int(tracker, path, line_no, "user_id", fields[0].strip(), 1, MAX_ID)
        age = _int(tracker, path, line_no, "age", fields[1].strip(), 0, 150) if uid is not None else None
        if uid is None or age is None:
            continue
        out[uid] = (age, fields[2].strip(), fields[3].strip(), fields[4].strip())
    return out


def _parse_items_recbole(path: Path, tracker: BadRowTracker) -> Dict[int, Tuple[int, List[str]]]:
    out = {}
    for line_no, line in _read_lines(path):
        if line_no == 1:
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            tracker.bad(path, line_no, "row", line[:80], f"4 tab-separated fields (item_id, title, year, genres), got {len(fields)}")
            continue
        iid = _int(tracker, path, line_no, "item_id", fields[0].strip(), 1, MAX_ID)
        if iid is None:
            continue
        year = int(fields[2]) if fields[2].strip().isdigit() else 0
        out[iid] = (year, fields[3].split())
    return out


_GROUPLENS_GENRES = [
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


def _parse_items_grouplens(path: Path, tracker: BadRowTracker) -> Dict[int, Tuple[int, List[str]]]:
    out = {}
    for line_no, line in _read_lines(path, encoding="latin-1"):
        fields = line.split("|")
        if len(fields) != 5 + len(_GROUPLENS_GENRES):
            tracker.bad(path, line_no, "row", line[:80], f"{5 + len(_GROUPLENS_GENRES)} '|'-separated fields, got {len(fields)}")
            continue
        iid = _int(tracker, path, line_no, "item_id", fields[0].strip(), 1, MAX_ID)
        if iid is None:
            continue
        date = fields[2].strip()
        year = int(date[-4:]) if len(date) >= 4 and date[-4:].isdigit() else 0
        genres = [g for g, flag in zip(_GROUPLENS_GENRES, fields[5:]) if flag.strip() == "1"]
        out[iid] = (year, genres)
    return out


def load_raw(folder: Path, tracker: BadRowTracker) -> _Raw:
    """Parse either file layout; every bad row goes through ``tracker`` (error or skip)."""
    if (folder / "u.data").is_file():
        users, items, ratings, ts = _parse_ratings(folder / "u.data", "\t", False, tracker)
        user_attr = _parse_users(folder / "u.user", "|", False, tracker)
        item_attr = _parse_items_grouplens(folder / "u.item", tracker)
    elif (folder / "ml-100k.inter").is_file():
        users, items, ratings, ts = _parse_ratings(folder / "ml-100k.inter", "\t", True, tracker)
        user_attr = _parse_users(folder / "ml-100k.user", "\t", True, tracker)
        item_attr = _parse_items_recbole(folder / "ml-100k.item", tracker)
    else:
        raise DataError(f"{folder}: expected MovieLens-100K files (u.data, u.user, u.item or ml-100k.inter/.user/.item)")
    inter = folder / ("u.data" if (folder / "u.data").is_file() else "ml-100k.inter")
    keep = np.ones(len(users), dtype=bool)
    for i in np.flatnonzero(~np.isin(users, list(user_attr))):
        tracker.bad(inter, -1, "user_id", str(users[i]), "a user listed in the user file")
        keep[i] = False
    for i in np.flatnonzero(keep & ~np.isin(items, list(item_attr))):
        tracker.bad(inter, -1, "item_id", str(items[i]), "an item listed in the item file")
        keep[i] = False
    return _Raw(users[keep], items[keep], ratings[keep], ts[keep], user_attr, item_attr)


# ------------------------------------------------------------------------ source
class MovieLensSource:
    """Random access to the three chronological splits; see the module docstring."""

    def __init__(self, cfg, bad_row_policy: str = "error", cache_dir: Optional[Path] = None):
        self.cfg = cfg
        folder = Path(cfg.path).expanduser() if cfg.path else ensure_movielens(Path(cache_dir or _default_cache()))
        tracker = BadRowTracker(bad_row_policy)
        raw = load_raw(folder, tracker)
        self.bad_rows = tracker.count
        self.folder = folder
        self._build(raw)

    # Vocabularies: row 0 of every table is "unknown / padding".
    def _build(self, raw: _Raw) -> None:
        cfg = self.cfg
        thr = cfg.like_threshold
        occupations = sorted({attrs[2] for attrs in raw.user_attr.values()})
        genres = sorted({genre for _, gs in raw.item_attr.values() for genre in gs})
        self._occ_index = {occupation: i + 1 for i, occupation in enumerate(occupations)}
        self._genre_index = {genre: i + 1 for i, genre in enumerate(genres)}
        num_users = int(max(raw.user_attr)) + 1
        num_items = int(max(raw.item_attr)) + 1

        # Per-user attribute arrays indexed by id.
        self.u_age = np.zeros(num_users, dtype=np.int64)
        self.u_gender = np.zeros(num_users, dtype=np.int64)
        self.u_occ = np.zeros(num_users, dtype=np.int64)
        self.u_zip = np.zeros(num_users, dtype=np.int64)
        for uid, (age, gender, occ, zipc) in raw.user_attr.items():
            self.u_age[uid] = 1 + int(np.searchsorted(_AGE_BUCKETS, age, side="right"))
            self.u_gender[uid] = {"M": 1, "F": 2}.get(gender, 0)
            self.u_occ[uid] = self._occ_index[occ]
            self.u_zip[uid] = 1 + int(zipc[0]) if zipc[:1].isdigit() else 0  # first zip digit = US region
        self.i_year = np.zeros(num_items, dtype=np.int64)
        glen = np.zeros(num_items, dtype=np.int64)
        gvals: List[List[int]] = [[] for _ in range(num_items)]
        for iid, (year, gs) in raw.item_attr.items():
            self.i_year[iid] = year
            gvals[iid] = [self._genre_index[genre] for genre in gs] or [0]
            glen[iid] = len(gvals[iid])
        glen[glen == 0] = 1
        gvals = [item_genres or [0] for item_genres in gvals]
        self.i_genre_len = glen
        self.i_genre_val = np.concatenate([np.asarray(item_genres, dtype=np.int64) for item_genres in gvals])

        # Chronological order per user: (user, timestamp, file position).
        order = np.lexsort((np.arange(len(raw.users)), raw.timestamps, raw.users))
        users, items = raw.users[order], raw.items[order]
        ratings, ts = raw.ratings[order], raw.timestamps[order]
        num_ratings = len(users)
        user_start = np.searchsorted(users, users, side="left")
        user_end = np.searchsorted(users, users, side="right")
        pos = np.arange(num_ratings) - user_start
        count = user_end - user_start
        split = np.where(pos >= count - HOLDOUT, 3, np.where(pos >= count - 2 * HOLDOUT, 2, 1))

        # Event lists per type, kept in the same (user, time) order; history of an example =
        # events of its user with timestamp < its own (searchsorted on (user, ts) keys).
        self.events: Dict[str, Dict[str, np.ndarray]] = {}
        key = users * 10**10 + ts  # (user, ts) as one sortable int64; ts < 1e10 s
        self._hist: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        for name, mask in (("like", ratings >= thr), ("dislike", ratings < thr)):
            ev = {"items": items[mask], "ratings": ratings[mask], "ts": ts[mask], "key": key[mask]}
            self.events[name] = ev
            ukey = users * 10**10
            lo = np.searchsorted(ev["key"], ukey, side="left")  # first event of the user
            hi = np.searchsorted(ev["key"], key, side="left")  # first event not strictly earlier
            self._hist[name] = (lo, hi)

        self._ex = {"user": users, "item": items, "rating": ratings, "ts": ts}
        self._split_rows = {name: np.flatnonzero(split == code) for name, code in (("train", 1), ("eval", 2), ("test", 3))}
        self._history_dense = _standardised_history_features(
            users, items, ratings, ts, genre_matrix(glen, self.i_genre_val, len(genres) + 1), thr, train=split == 1
        )

        self.schema = FeatureSchema(
            tables=[
                TableSpec("user", num_users),
                TableSpec("item", num_items),
                TableSpec("age", len(_AGE_BUCKETS) + 2),
                TableSpec("gender", 3),
                TableSpec("occupation", len(occupations) + 1),
                TableSpec("zip_region", 11),
                TableSpec("genre", len(genres) + 1),
                TableSpec("decade", 16),
                TableSpec("hour", 24),
                TableSpec("weekday", 7),
                TableSpec("seq_item", num_items),
                TableSpec("rating", 6),
            ],
            dense_features=["log_history_len", "mean_history_rating", "like_share", "years_since_release", *HISTORY_FEATURES],
            context_features=[
                ContextFeature("user_id", "user"),
                ContextFeature("item_id", "item"),
                ContextFeature("age", "age"),
                ContextFeature("gender", "gender"),
                ContextFeature("occupation", "occupation"),
                ContextFeature("zip_region", "zip_region"),
                ContextFeature("genres", "genre", max_ids=_MAX_GENRES),
                ContextFeature("decade", "decade"),
                ContextFeature("hour", "hour"),
                ContextFeature("weekday", "weekday"),
            ],
            event_types=[
                EventType("like", "seq_item", "rating", cfg.max_history_len),
                EventType("dislike", "seq_item", "rating", cfg.max_history_len),
            ],
            labels=list(cfg.labels),
            label_types=[MOVIELENS_LABELS[name] for name in cfg.labels],
        )

    def num_examples(self, split: str) -> int:
        return len(self._split_rows[split])

    def read(self, split: str, indices: np.ndarray) -> ExampleBlock:
        rows = self._split_rows[split][np.asarray(indices, dtype=np.int64)]
        num_rows = len(rows)
        users, items = self._ex["user"][rows], self._ex["item"][rows]
        ts, ratings = self._ex["ts"][rows], self._ex["rating"][rows]
        ones = np.ones(num_rows, dtype=np.int64)
        decade = np.clip((self.i_year[items] - 1900) // 10 + 1, 0, 15)
        decade[self.i_year[items] == 0] = 0
        events: Dict[str, EventColumns] = {}
        hist_len = np.zeros(num_rows)
        rating_sum = np.zeros(num_rows)
        likes = np.zeros(num_rows)
        for name, ev in self.events.items():
            lo, hi = self._hist[name]
            start, end = lo[rows], hi[rows]
            total = end - start
            lengths = np.minimum(total, self.cfg.max_history_len)
            idx = ranges(end - lengths, lengths)
            events[name] = EventColumns(lengths, ev["items"][idx], ev["ratings"][idx], ev["ts"][idx])
            # Dense summaries use the full history, not just the kept window.
            csum = np.concatenate([[0], np.cumsum(ev["ratings"])])
            rating_sum += csum[end] - csum[start]
            hist_len += total
            if name == "like":
                likes += total
        years = np.where(self.i_year[items] > 0, 1970 + ts / (365.25 * 86400) - self.i_year[items], 0.0)
        dense = np.stack(
            [
                np.log1p(hist_len),
                rating_sum / np.maximum(hist_len, 1) / 5.0,
                likes / np.maximum(hist_len, 1),
                np.clip(years, 0, 80) / 10.0,
            ],
            axis=1,
        ).astype(np.float32)
        dense = np.concatenate([dense, self._history_dense[rows]], axis=1)
        genres = gather_jagged(self.i_genre_len, self.i_genre_val, items)
        return ExampleBlock(
            dense=dense,
            context={
                "user_id": Jagged(ones, users),
                "item_id": Jagged(ones, items),
                "age": Jagged(ones, self.u_age[users]),
                "gender": Jagged(ones, self.u_gender[users]),
                "occupation": Jagged(ones, self.u_occ[users]),
                "zip_region": Jagged(ones, self.u_zip[users]),
                "genres": genres,
                "decade": Jagged(ones, decade),
                "hour": Jagged(ones, (ts // 3600) % 24),
                "weekday": Jagged(ones, (ts // 86400 + 3) % 7),  # 1970-01-01 was a Thursday
            },
            events=events,
            request_time=ts,
            labels=self.labels(ratings),
        )

    def labels(self, ratings: np.ndarray) -> np.ndarray:
        """``[N, len(cfg.labels)]`` float32 labels of ratings ``[N]`` (1..5), one column per
        name of ``data.movielens.labels``: like (0/1), love (0/1), rating (1.0..5.0)."""
        ratings = np.asarray(ratings)
        columns = {
            "like": lambda: ratings >= self.cfg.like_threshold,
            "love": lambda: ratings == 5,
            "rating": lambda: ratings,
        }
        return np.stack([columns[name]().astype(np.float32) for name in self.cfg.labels], axis=1)


def _standardised_history_features(users, items, ratings, ts, genres, like_threshold: float, train: np.ndarray) -> np.ndarray:
    """``[N, len(HISTORY_FEATURES)]`` float32: :func:`history_features` of every rating (in
    (user, time) order), standardised with the train split's mean and std (so the towers
    see unit-scale inputs); priors and scaling constants come from the train split only."""
    _, feats = history_features(
        users,
        items,
        ratings,
        ts,
        genres,
        like_threshold,
        mean_rating=float(ratings[train].mean()),
        mean_like=float((ratings[train] >= like_threshold).mean()),
    )
    values = np.stack([feats[name] for name in HISTORY_FEATURES], axis=1)
    mean, std = values[train].mean(axis=0), values[train].std(axis=0)
    return ((values - mean) / np.maximum(std, 1e-6)).astype(np.float32)


def _default_cache() -> Path:
    return default_cache_dir()
