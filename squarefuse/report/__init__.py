"""Sweeps into tables and pictures: `python scripts/report.py multirun/<date>/<time>/`.

runs          find run folders and read what they recorded
groups        group runs by the config keys that differ; find the baseline group
significance  exact McNemar test on per-video correctness
aggregate     per-group mean ± std over seeds, costs, the paired comparison
plots, write  the PNG figures, report.md and report.csv
matrix        the temporal benchmark's task x fusion matrix of test top-1 (`--matrix`), its heat map
lr_grid       the benchmark's lr choice on val, every grid point, the fusion parameters
app           the command line
"""
