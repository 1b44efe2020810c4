"""fedtune: federated fine-tuning of language models (FedAvg-LoRA, FLoRA, Fed-SB, FedKSeed)."""

__version__ = "0.1.0"
