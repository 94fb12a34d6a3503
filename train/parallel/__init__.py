"""The parallel seam: the layout and its process groups (`dims`), joining the torchrun world and every
collective the loop, precision and checkpoints need, each over a named group (`distributed`), and
the sharded optimizer (`zero`). How an engine lays its model over the groups lives with the engine
(`train.engines`)."""
