"""The step: ZO estimation over tensors, directions, perturbation, HybridOptimizer, the
parameter split, the methods as partitions, the sampler and schedules (torch and peft only:
no config, no files, no command line)."""
