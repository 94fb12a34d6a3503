"""The training data path, in the order data flows: `shards` (webdataset tars) -> `decode`
(images, videos) -> `tiling` -> `conversation` (chat template, labels) -> `samples` (plan, then
build) -> `packing` (rows) -> `batch` (the batch contract) -> `loader` (the per-rank batch stream),
with `config` (the data section of a recipe), `evs` and `special_tokens` beside them."""
