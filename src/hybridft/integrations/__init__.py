"""hybridft inside other training frameworks (transformers.Trainer)."""
