"""Offline tuning: a grid of settings run on recordings (tuning.tune), scored against annotated
target epochs (tuning.scoring), on a process pool or Dask (tuning.executors), from BIDS studies
(tuning.study)."""
