"""The training loop of one stage and of the pipeline: `assembly` (one function builds a stage in a
fixed order, for the trainer, `train.plan --measure` and chat), `trainer` (data, assembly, resume,
the loop), `train_module` (one optimizer step), `callbacks` (validation, metrics file, wandb,
progress, checkpointing and preemption), `preemption` (signals -> save and exit 75), `run_lock`,
`exits`, `pipeline` (stages in order, each from the previous one's weights)."""
