"""Run reports: `report.html` and its plots from a run directory (`train.reporting.report`)."""
