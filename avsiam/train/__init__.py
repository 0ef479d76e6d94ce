"""The training engine: DeepSpeed pretraining and finetuning as resumable multi-process jobs."""
