"""Show what training sees: a few samples, or one packed batch, rendered as an HTML page.

Entry point of `python -m data_pipelines.inspect`; the tool lives in `data_pipelines.tools.inspect`."""

import sys

from data_pipelines.tools.inspect import main

if __name__ == "__main__":
    sys.exit(main())
