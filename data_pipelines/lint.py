"""Shard linter: run every sample through the training path and report what training would skip.

Entry point of `python -m data_pipelines.lint`; the tool lives in `data_pipelines.tools.lint`."""

import sys

from data_pipelines.tools.lint import main

if __name__ == "__main__":
    sys.exit(main())
