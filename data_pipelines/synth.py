"""Embedded synthetic data: real shards with answers derivable from the media or code.

Entry point of `python -m data_pipelines.synth`; the tool lives in `data_pipelines.tools.synth`."""

import sys

from data_pipelines.tools.synth import main

if __name__ == "__main__":
    sys.exit(main())
