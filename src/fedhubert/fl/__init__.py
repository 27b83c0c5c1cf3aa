"""Flower: the federation runner and daemons, the round loop and a client's round, weights, strategies and records,
and the ServerApp and ClientApp built from the tasks the stages declare. Nothing here imports a stage."""
