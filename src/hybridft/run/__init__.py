"""A training run: its config, the loop, checkpoints and resume, the replay log, data
parallelism, export, and zero-shot evaluation."""
