"""MovieLens parsing, chronological split and histories, on small files written here.

Five users with 25-29 ratings each; user ``u`` rates only items ``100*u + j``, so every
item id tells whose rating it is. Some ratings share a timestamp (same-second ratings
must not be each other's history), and the file order is shuffled (the source sorts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from kunlun.data.batch import ExampleBlock
from kunlun.data.errors import DataError
from kunlun.data.sources.movielens import HOLDOUT, MovieLensSource, ensure_movielens
from kunlun.trainer.config import ConfigError, MovieLensConfig, default_cache_dir, load_config

GENRES = [
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
USERS = {  # id → age, gender, occupation, zip
    1: (24, "M", "technician", "85711"),
    2: (53, "F", "other", "94043"),
    3: (23, "M", "writer", "32067"),
    4: (17, "M", "student", "43537"),
    5: (33, "F", "other", "15213"),
}
T0 = 880_000_000


@dataclass
class Rating:
    user: int
    item: int
    rating: int
    ts: int
    order: int  # position in the ratings file (tie-break among equal timestamps)


def make_ratings(seed: int = 0) -> List[Rating]:
    rng = np.random.default_rng(seed)
    out: List[Rating] = []
    for u in USERS:
        n = 24 + u  # 25..29 ratings
        ts = T0 + u * 1000 + np.cumsum(rng.integers(1, 50, n))
        # some ratings in the same second as the one before (same session)
        ties = rng.choice(np.arange(1, n), size=6, replace=False)
        for t in sorted(ties):
            ts[t] = ts[t - 1]
        ratings = rng.integers(1, 6, n)
        for j in range(n):
            out.append(Rating(u, 100 * u + j, int(ratings[j]), int(ts[j]), -1))
    perm = rng.permutation(len(out))
    shuffled = [out[i] for i in perm]
    for k, r in enumerate(shuffled):
        r.order = k
    return shuffled


def _items(ratings: List[Rating]) -> Dict[int, Tuple[int, List[str]]]:
    items = {}
    for r in ratings:
        iid = r.item
        genres = [GENRES[(iid + k * 7) % len(GENRES)] for k in range(1 + iid % 3)]
        items[iid] = (1950 + iid % 50, sorted(set(genres)))
    return items


def write_grouplens(folder: Path, ratings: List[Rating], extra_rating_lines: Optional[Dict[int, str]] = None) -> Path:
    """``extra_rating_lines``: {1-based line number in u.data: raw line} inserted at that line."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{r.user}\t{r.item}\t{r.rating}\t{r.ts}" for r in ratings]
    extra_rating_lines = extra_rating_lines or {}
    for line_no in sorted(extra_rating_lines):
        lines.insert(line_no - 1, extra_rating_lines[line_no])
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    (folder / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|{z}\n" for u, (a, g, o, z) in USERS.items()))
    item_lines = []
    for iid, (year, genres) in sorted(_items(ratings).items()):
        flags = "|".join("1" if g in genres else "0" for g in GENRES)
        item_lines.append(f"{iid}|Film n\xba{iid} ({year})|01-Jan-{year}||http://us.imdb.com/M/title-exact?x{iid}|{flags}\n")
    (folder / "u.item").write_bytes("".join(item_lines).encode("latin-1"))
    return folder


def write_recbole(folder: Path, ratings: List[Rating], extra_rating_lines: Optional[Dict[int, str]] = None) -> Path:
    """Line numbers of ``extra_rating_lines`` count the header as line 1."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{r.user}\t{r.item}\t{r.rating}\t{r.ts}" for r in ratings]
    extra_rating_lines = extra_rating_lines or {}
    for line_no in sorted(extra_rating_lines):
        lines.insert(line_no - 1, extra_rating_lines[line_no])
    (folder / "ml-100k.inter").write_text("\n".join(lines) + "\n")
    (folder / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "".join(f"{u}\t{a}\t{g}\t{o}\t{z}\n" for u, (a, g, o, z) in USERS.items())
    )
    item_lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"]
    for iid, (year, genres) in sorted(_items(ratings).items()):
        canonical = [g for g in GENRES if g in genres]  # the order of the GroupLens flags, as RecBole writes them
        item_lines.append(f"{iid}\tFilm {iid}\t{year}\t{' '.join(canonical)}\n")
    (folder / "ml-100k.item").write_text("".join(item_lines))
    return folder


WRITERS = {"grouplens": write_grouplens, "recbole": write_recbole}
RATINGS_FILE = {"grouplens": "u.data", "recbole": "ml-100k.inter"}


def load(folder: Path, policy: str = "error", max_history_len: int = 50) -> MovieLensSource:
    return MovieLensSource(MovieLensConfig(path=str(folder), max_history_len=max_history_len), bad_row_policy=policy)


def read_all(src: MovieLensSource, split: str) -> ExampleBlock:
    return src.read(split, np.arange(src.num_examples(split)))


def _chronological(ratings: List[Rating], user: int) -> List[Rating]:
    return sorted((r for r in ratings if r.user == user), key=lambda r: (r.ts, r.order))


def _history(block: ExampleBlock, name: str, i: int) -> Tuple[List[int], List[int], List[int]]:
    ev = block.events[name]
    off = np.concatenate([[0], np.cumsum(ev.lengths)])
    s = slice(off[i], off[i + 1])
    return ev.items[s].tolist(), ev.actions[s].tolist(), ev.timestamps[s].tolist()


@pytest.fixture(scope="module")
def ratings() -> List[Rating]:
    return make_ratings()


@pytest.fixture(scope="module", params=["grouplens", "recbole"])
def layout(request, tmp_path_factory, ratings):
    folder = WRITERS[request.param](tmp_path_factory.mktemp(request.param) / "ml-100k", ratings)
    return request.param, folder


# ============================================================================ splits
def test_chronological_split_per_user(layout, ratings):
    _, folder = layout
    src = load(folder)
    assert src.bad_rows == 0
    assert sum(src.num_examples(s) for s in ("train", "eval", "test")) == len(ratings)
    assert src.num_examples("test") == src.num_examples("eval") == HOLDOUT * len(USERS)
    got = {}
    for split in ("train", "eval", "test"):
        b = read_all(src, split)
        users = b.context["user_id"].values
        items = b.context["item_id"].values
        assert np.all(items // 100 == users)
        got[split] = {(int(u), int(i)) for u, i in zip(users, items)}
        assert len(got[split]) == len(b)  # each rating once
    for u in USERS:
        chrono = _chronological(ratings, u)
        assert 25 <= len(chrono) <= 29
        keys = [(r.user, r.item) for r in chrono]
        assert {k for k in got["test"] if k[0] == u} == set(keys[-10:])
        assert {k for k in got["eval"] if k[0] == u} == set(keys[-20:-10])
        assert {k for k in got["train"] if k[0] == u} == set(keys[:-20])


def test_example_fields_labels_and_histories(layout, ratings):
    _, folder = layout
    max_len = 7
    src = load(folder, max_history_len=max_len)
    by_key = {(r.user, r.item): r for r in ratings}
    truncated = 0
    for split in ("train", "eval", "test"):
        b = read_all(src, split)
        for i in range(len(b)):
            u, item = int(b.context["user_id"].values[i]), int(b.context["item_id"].values[i])
            r = by_key[(u, item)]
            t = int(b.request_time[i])
            assert t == r.ts
            assert b.labels[i, 0] == float(r.rating >= 4)
            earlier = [e for e in _chronological(ratings, u) if e.ts < t]  # strictly earlier only
            n_earlier = len(earlier)
            for name, keep in (("like", lambda x: x >= 4), ("dislike", lambda x: x < 4)):
                items, actions, ts = _history(b, name, i)
                exp = [e for e in earlier if keep(e.rating)][-max_len:]  # most recent, oldest first
                truncated += len([e for e in earlier if keep(e.rating)]) > max_len
                assert items == [e.item for e in exp], (split, u, item, name)
                assert actions == [e.rating for e in exp]
                assert ts == [e.ts for e in exp]
                assert all(x < t for x in ts)  # no leakage, ties included
                assert all(x // 100 == u for x in items)  # the user's own events
                assert all(keep(a) for a in actions)  # like / dislike by rating threshold
            # dense summaries use the whole history, not the kept window
            likes = sum(e.rating >= 4 for e in earlier)
            assert b.dense[i, 0] == pytest.approx(np.log1p(n_earlier), rel=1e-6)
            assert b.dense[i, 1] == pytest.approx(sum(e.rating for e in earlier) / max(n_earlier, 1) / 5, rel=1e-6)
            assert b.dense[i, 2] == pytest.approx(likes / max(n_earlier, 1), rel=1e-6)
    assert truncated > 0  # the max_history_len cut was exercised


def test_same_second_ratings_are_not_history(layout, ratings):
    _, folder = layout
    src = load(folder)
    # find a tie: two ratings of one user in the same second
    chrono = _chronological(ratings, 1)
    a, b = next((x, y) for x, y in zip(chrono, chrono[1:]) if x.ts == y.ts)
    for split in ("train", "eval", "test"):
        blk = read_all(src, split)
        for i, item in enumerate(blk.context["item_id"].values):
            if item == b.item:
                hist = _history(blk, "like", i)[0] + _history(blk, "dislike", i)[0]
                assert a.item not in hist
                assert len(hist) == sum(e.ts < b.ts for e in chrono)
                return
    raise AssertionError("tied rating not found")


def test_context_features(layout, ratings):
    _, folder = layout
    src = load(folder)
    b = read_all(src, "test")
    users = b.context["user_id"].values
    # ages 24, 53, 23, 17, 33 → buckets after [18, 25, 35, 45, 50, 56]
    bucket = {1: 2, 2: 6, 3: 2, 4: 1, 5: 3}
    assert [int(x) for x in b.context["age"].values] == [bucket[int(u)] for u in users]
    assert [int(x) for x in b.context["gender"].values] == [1 if USERS[int(u)][1] == "M" else 2 for u in users]
    assert [int(x) for x in b.context["zip_region"].values] == [1 + int(USERS[int(u)][3][0]) for u in users]
    # genres: the multi-valued feature holds the item's genres (vocabulary: sorted names, 1-based)
    vocab = sorted({g for _, gs in _items(ratings).values() for g in gs})
    g = b.context["genres"]
    off = np.concatenate([[0], np.cumsum(g.lengths)])
    items = _items(ratings)
    for i, iid in enumerate(b.context["item_id"].values):
        names = [vocab[k - 1] for k in g.values[off[i] : off[i + 1]]]
        assert sorted(names) == items[int(iid)][1]
    sizes = src.schema.table_sizes
    for f in src.schema.context_features:
        col = b.context[f.name]
        assert col.values.min() >= 0 and col.values.max() < sizes[f.table], f.name
        assert col.lengths.max() <= f.max_ids


def test_both_layouts_give_identical_examples(tmp_path, ratings):
    a = load(write_grouplens(tmp_path / "gl", ratings))
    b = load(write_recbole(tmp_path / "rb", ratings))
    assert a.schema.table_sizes == b.schema.table_sizes
    for split in ("train", "eval", "test"):
        x, y = read_all(a, split), read_all(b, split)
        np.testing.assert_array_equal(x.request_time, y.request_time)
        np.testing.assert_array_equal(x.labels, y.labels)
        np.testing.assert_allclose(x.dense, y.dense)
        for k in x.context:
            np.testing.assert_array_equal(x.context[k].values, y.context[k].values, err_msg=k)
            np.testing.assert_array_equal(x.context[k].lengths, y.context[k].lengths, err_msg=k)
        for k in x.events:
            np.testing.assert_array_equal(x.events[k].items, y.events[k].items)
            np.testing.assert_array_equal(x.events[k].timestamps, y.events[k].timestamps)


def test_like_threshold_changes_labels_and_event_types(tmp_path, ratings):
    folder = write_recbole(tmp_path / "rb", ratings)
    src = MovieLensSource(MovieLensConfig(path=str(folder), like_threshold=5.0))
    by_key = {(r.user, r.item): r for r in ratings}
    b = read_all(src, "eval")
    for i in range(len(b)):
        r = by_key[(int(b.context["user_id"].values[i]), int(b.context["item_id"].values[i]))]
        assert b.labels[i, 0] == float(r.rating == 5)
    assert set(b.events["like"].actions.tolist()) <= {5}
    assert set(b.events["dislike"].actions.tolist()) <= {1, 2, 3, 4}


# ============================================================================ labels (multi-task)
def test_default_label_is_like_binary(tmp_path, ratings):
    src = load(write_grouplens(tmp_path / "gl", ratings))
    assert src.schema.labels == ["like"] and src.schema.label_types == ["binary"]
    assert read_all(src, "train").labels.shape[1] == 1


@pytest.mark.parametrize("names", [["like", "rating", "love"], ["rating"], ["love", "like"]])
def test_multitask_labels_against_raw_ratings(layout, ratings, names):
    _, folder = layout
    src = MovieLensSource(MovieLensConfig(path=str(folder), labels=names))
    types = {"like": "binary", "love": "binary", "rating": "regression"}
    assert src.schema.labels == names and src.schema.label_types == [types[n] for n in names]
    by_key = {(r.user, r.item): r for r in ratings}
    want = {"like": lambda r: float(r.rating >= 4), "love": lambda r: float(r.rating == 5), "rating": lambda r: float(r.rating)}
    seen = set()
    for split in ("train", "eval", "test"):
        b = read_all(src, split)
        assert b.labels.shape == (len(b), len(names)) and b.labels.dtype == np.float32
        for i in range(len(b)):
            r = by_key[(int(b.context["user_id"].values[i]), int(b.context["item_id"].values[i]))]
            assert b.labels[i].tolist() == [want[n](r) for n in names]
            seen.add(r.rating)
    assert seen == {1, 2, 3, 4, 5}
    # the other columns do not depend on the labels chosen
    plain = read_all(load(folder), "eval")
    np.testing.assert_array_equal(read_all(src, "eval").dense, plain.dense)


@pytest.mark.parametrize(
    "value, expected", [("[like,stars]", "each one of ['like', 'love', 'rating']"), ("[]", "a non-empty list"), ("[like,like]", "distinct")]
)
def test_unknown_movielens_label_is_a_config_error(value, expected):
    with pytest.raises(ConfigError) as ei:
        load_config("movielens", [f"data.movielens.labels={value}"])
    assert "'data.movielens.labels'" in str(ei.value) and expected in str(ei.value)


def test_movielens_mt_preset_loads():
    cfg = load_config("movielens-mt")
    assert cfg.data.source == "movielens" and cfg.data.movielens.labels == ["like", "rating", "love"]
    assert [(t.name, t.label, t.type) for t in cfg.model.tasks] == [("like", "like", "binary"), ("rating", "rating", "regression"), ("love", "love", "binary")]
    assert cfg.model.multitask.mixer == "mmoe" and cfg.trainer.early_stopping.metric == "eval/like/ne"


# ============================================================================ bad rows
# (raw line, field named in the error); the user/item ids are valid unless the row says otherwise
BAD_ROWS = [
    ("1\t100\t3", "row"),  # 3 fields
    ("1\t101\tgood\t880000500", "rating"),  # non-numeric rating
    ("0\t102\t3\t880000500", "user_id"),  # zero user id
    ("-2\t103\t3\t880000500", "user_id"),  # negative user id
    ("1\t104\t7\t880000500", "rating"),  # rating out of range
    ("1\t105\tinf\t880000500", "rating"),  # not a finite number
    ("2\tx\t3\t880000500", "item_id"),
    ("2\t201\t3\t88000.5", "timestamp"),
]


@pytest.mark.parametrize("style", ["grouplens", "recbole"])
@pytest.mark.parametrize("bad_line, field", BAD_ROWS)
def test_bad_row_error_names_file_line_field(tmp_path, ratings, style, bad_line, field):
    line_no = 17
    folder = WRITERS[style](tmp_path / "ml", ratings, {line_no: bad_line})
    with pytest.raises(DataError) as ei:
        load(folder, policy="error")
    msg = str(ei.value)
    assert f"{folder / RATINGS_FILE[style]}:{line_no}:" in msg
    assert f"field '{field}'" in msg
    assert "bad_row_policy=skip" in msg


@pytest.mark.parametrize("style", ["grouplens", "recbole"])
def test_bad_rows_skipped_and_counted(tmp_path, ratings, style):
    extra = {5 + 3 * k: line for k, (line, _) in enumerate(BAD_ROWS)}
    extra[60] = "-1\t100\t9\t880000500"  # two bad fields in one row: still one bad row
    folder = WRITERS[style](tmp_path / "ml", ratings, extra)
    src = load(folder, policy="skip")
    assert src.bad_rows == len(BAD_ROWS) + 1
    clean = load(WRITERS[style](tmp_path / "clean", ratings))
    assert clean.bad_rows == 0
    for split in ("train", "eval", "test"):
        assert src.num_examples(split) == clean.num_examples(split)
        x, y = read_all(src, split), read_all(clean, split)
        np.testing.assert_array_equal(x.context["item_id"].values, y.context["item_id"].values)
        np.testing.assert_array_equal(x.events["like"].items, y.events["like"].items)


def test_rating_of_unknown_user_or_item(tmp_path, ratings):
    extra = {3: "9\t100\t3\t880000500", 4: "1\t999\t3\t880000500", 5: "8\t998\t4\t880000500"}
    folder = write_grouplens(tmp_path / "ml", ratings, extra)
    with pytest.raises(DataError) as ei:
        load(folder)
    msg = str(ei.value)
    assert str(folder / "u.data") in msg and "'user_id'" in msg and "'9'" in msg
    src = load(folder, policy="skip")
    assert src.bad_rows == 3  # the row with both an unknown user and item counts once
    assert sum(src.num_examples(s) for s in ("train", "eval", "test")) == len(ratings)


def test_bad_user_row_names_user_file(tmp_path, ratings):
    folder = write_grouplens(tmp_path / "ml", ratings)
    text = (folder / "u.user").read_text().splitlines()
    text.insert(2, "6|old|M|other|12345")  # line 3
    (folder / "u.user").write_text("\n".join(text) + "\n")
    with pytest.raises(DataError) as ei:
        load(folder)
    msg = str(ei.value)
    assert f"{folder / 'u.user'}:3:" in msg and "field 'age'" in msg and "'old'" in msg
    assert load(folder, policy="skip").bad_rows == 1


def test_missing_folder_and_files(tmp_path, ratings):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as ei:
        load(missing)
    assert str(missing) in str(ei.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="u.data") as ei:
        load(empty)
    assert str(empty) in str(ei.value)
    folder = write_grouplens(tmp_path / "gl", ratings)
    (folder / "u.item").unlink()
    with pytest.raises(DataError) as ei:
        load(folder)
    assert f"{folder / 'u.item'}: file not found" in str(ei.value)
    folder = write_recbole(tmp_path / "rb", ratings)
    (folder / "ml-100k.user").unlink()
    with pytest.raises(DataError) as ei:
        load(folder)
    assert f"{folder / 'ml-100k.user'}: file not found" in str(ei.value)


def test_ratings_file_without_valid_rows(tmp_path, ratings):
    folder = write_recbole(tmp_path / "rb", ratings)
    (folder / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t100\tbad\t1\n")
    with pytest.raises(DataError, match="no valid ratings") as ei:
        load(folder, policy="skip")
    assert str(folder / "ml-100k.inter") in str(ei.value)


# ============================================================================ real data
@pytest.mark.network
def test_real_movielens_100k():
    folder = default_cache_dir() / "ml-100k"
    if not all((folder / m).is_file() for m in ("ml-100k.inter", "ml-100k.user", "ml-100k.item")):
        folder = ensure_movielens(default_cache_dir())
    src = load(folder)
    assert src.bad_rows == 0
    n = {s: src.num_examples(s) for s in ("train", "eval", "test")}
    assert sum(n.values()) == 100_000
    assert n["eval"] == n["test"] == 9_430
    labels = []
    all_users: set = set()
    for split in ("train", "eval", "test"):
        idx = np.arange(n[split])
        b = src.read(split, idx)
        labels.append(b.labels[:, 0])
        users = b.context["user_id"].values
        all_users.update(users.tolist())
        if split != "train":
            counts = np.bincount(users)
            assert np.count_nonzero(counts) == 943
            assert set(counts[counts > 0].tolist()) == {HOLDOUT}
        for name in ("like", "dislike"):
            ev = b.events[name]
            row = np.repeat(np.arange(len(b)), ev.lengths)
            assert np.all(ev.timestamps < b.request_time[row])
            assert ev.lengths.max() <= 50
    assert len(all_users) == 943  # (users with exactly 20 ratings have no train examples)
    rate = float(np.concatenate(labels).mean())
    assert rate == pytest.approx(0.554, abs=0.01)
    assert src.schema.table_sizes["user"] == 944 and src.schema.table_sizes["item"] == 1683


@pytest.mark.network
def test_real_movielens_multitask_labels():
    folder = ensure_movielens(default_cache_dir())
    src = MovieLensSource(MovieLensConfig(path=str(folder), labels=["like", "rating", "love"]))
    for split in ("train", "eval", "test"):
        b = src.read(split, np.arange(src.num_examples(split)))
        raw = src._ex["rating"][src._split_rows[split]]
        np.testing.assert_array_equal(b.labels[:, 0], (raw >= 4).astype(np.float32))
        np.testing.assert_array_equal(b.labels[:, 1], raw.astype(np.float32))
        np.testing.assert_array_equal(b.labels[:, 2], (raw == 5).astype(np.float32))
    assert set(np.unique(b.labels[:, 1]).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}


@pytest.mark.network
def test_real_movielens_history_statistics_are_the_standardised_leak_free_features():
    """The dense columns after the first four are ``movielens_history.history_features`` of
    each example's own rating (whose leak-freeness tests/benchmarks/test_movielens_baseline.py checks
    against the raw file), standardised with train-split constants."""
    from kunlun.data.sources.movielens_history import HISTORY_FEATURES, genre_matrix, history_features

    src = load(ensure_movielens(default_cache_dir()))
    assert src.schema.dense_features[4:] == list(HISTORY_FEATURES)
    ex, rows = src._ex, {s: src._split_rows[s] for s in ("train", "eval", "test")}
    train = rows["train"]
    _, feats = history_features(
        ex["user"],
        ex["item"],
        ex["rating"],
        ex["ts"],
        genre_matrix(src.i_genre_len, src.i_genre_val, src.schema.table_sizes["genre"]),
        4.0,
        mean_rating=float(ex["rating"][train].mean()),
        mean_like=float((ex["rating"][train] >= 4).mean()),
    )
    train_block = src.read("train", np.arange(len(train)))
    np.testing.assert_allclose(train_block.dense[:, 4:].mean(0), 0, atol=1e-4)  # standardised on train
    np.testing.assert_allclose(train_block.dense[:, 4:].std(0), 1, atol=1e-3)
    rng = np.random.default_rng(0)
    for split in ("eval", "test"):
        idx = rng.choice(len(rows[split]), 200, replace=False)
        b = src.read(split, idx)
        for j, name in enumerate(HISTORY_FEATURES):
            values = feats[name]
            expect = (values[rows[split][idx]] - values[train].mean()) / max(values[train].std(), 1e-6)
            np.testing.assert_allclose(b.dense[:, 4 + j], expect, rtol=1e-4, atol=1e-4, err_msg=name)
