"""MALoRA (Mixture of Asymmetric Low-Rank Adaptation) for multi-task fine-tuning with PyTorch Lightning."""
