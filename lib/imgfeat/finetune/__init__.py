"""Fine-tuning: decode once, train backbone + head with TorchDistributor, log the result (docs/finetuning.md)."""
