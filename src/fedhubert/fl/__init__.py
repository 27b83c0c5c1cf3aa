"""Flower: the federation runner, the ServerApp and ClientApp, and the federated tasks they carry."""
