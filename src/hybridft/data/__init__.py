"""Tasks and their data, how a task is posed to a model (formulations, candidate scoring),
evaluation, and model loading (hub id, local directory, GGUF, packaged names)."""
