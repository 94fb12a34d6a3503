"""The training loop of one stage and of the pipeline: `trainer` (data, the stage assembled by
`train.engines.assembly`, resume, the loop), `train_module` (one optimizer step), `callbacks`
(validation, metrics file, wandb, TensorBoard, progress, checkpointing and preemption),
`preemption` (signals -> save and exit 75), `run_lock`, `exits`, `pipeline` (stages in order, each
from the previous one's weights)."""
