"""Training: `train.py` -> `Trainer(cfg, run_dir).fit()`.

trainer        builds a run's parts (data, model, optimiser, schedule) and wires them; `state_dict`
loop           the loop: `fit`, `train_epoch`, `train_step`, validation; read it top to bottom
state          `TrainState` (the loop counters) and the RNG states a checkpoint keeps
resume         which checkpoint to resume, what may change, restoring the lr schedule
resume_checks  what changed between a checkpoint's config and the resuming run's, key by key
config_checks  `run_config`: the run's config, completed with what the data decides (a token cache's
               layout); `check_train_config`: the checks that need no data and no device
optim          the optimiser by `optim.name` (adamw | sgd), layer-wise lr decay
schedule       the lr schedule by `schedule.name` (cosine | step | constant, each with a warmup)
sample_order   a resumable sample order and per-sample augmentation seeds
init_from      `trainer.init_from=PATH`: start from another model's weights (fine-tuning)
run_lock       one training job per run folder
metrics_log    metrics.jsonl, the resolved config, the git commit, and wandb (rank 0)
"""
