"""Federated distillation of a DistilHuBERT student from a frozen pretrained HuBERT teacher."""
