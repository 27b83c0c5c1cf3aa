"""Federated HuBERT pretraining: the Flower client and server, records, and the `fedhubert pretrain` stage."""
