"""Reports on run folders: tables and figures (TensorBoard scalars are written by the run: medfl.tensorboard).

- `runs`: read run folders and group those that differ only by seed;
- `tables`: markdown tables per site and mean, methods side by side, mean +- std across seeds;
- `predictions`: rescore each site's selected-round model on its test split (confusion matrices,
  segmentation examples), since a run folder keeps models but not predictions;
- `plots`: PNG figures (validation curves with communications, retrogress, DET states, overlays);
- `writer`: `write_report`, which puts all of it into report.md plus PNGs;

Nothing is imported here: each module loads what it needs.
"""
