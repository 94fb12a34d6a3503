"""Local data -> webdataset shards in the project schema (DESIGN.md, "Shards").

Entry point of `python -m data_pipelines.convert`; the tool lives in `data_pipelines.tools.convert`."""

import sys

from data_pipelines.tools.convert import main

if __name__ == "__main__":
    sys.exit(main())
