"""The training loop of pretrain and fine-tune: objectives, EMA, checkpoints, DDP."""
