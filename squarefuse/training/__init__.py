"""Training: `train.py` -> `Trainer(cfg, run_dir).fit()`.

trainer        the training loop, its `state_dict` and resume; read it top to bottom
optim          AdamW with layer-wise lr decay, warmup + cosine schedule
sample_order   a resumable sample order and per-sample augmentation seeds
init_from      `trainer.init_from=PATH`: start from another model's weights (fine-tuning)
resume_checks  what changed between a checkpoint's config and the resuming run's
run_lock       one training job per run folder
metrics_log    metrics.jsonl, the resolved config, the git commit, and wandb (rank 0)
"""
