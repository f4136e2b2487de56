"""The study: a grid of runs (models x tasks x methods x seeds), its runner, report and plots."""
