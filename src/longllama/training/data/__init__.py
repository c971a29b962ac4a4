"""Training data: pre-training batches (pretrain) and fine-tuning examples (sft)."""
