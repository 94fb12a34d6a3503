"""The training loop of one stage and of the pipeline: `trainer` (build, resume, the loop),
`train_module` (one optimizer step), `callbacks` (metrics file, progress, wandb), `preemption`
(signals -> save and exit 75), `pipeline` (stages in order, each from the previous one's weights)."""
