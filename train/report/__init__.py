"""`python -m train.report RUN_DIR` (`__main__`): `report.html` and its plots from a stage or
pipeline run directory's metrics.jsonl / summary.json (`build`, also called at each stage's end)."""
