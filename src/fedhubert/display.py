"""How outputs show a federation: above MANY_CLIENTS clients, plots and TensorBoard show distributions over the
clients (bands, quantiles) rather than one line or tag per client. Kept apart from fedhubert.plots so that what
records rounds needs no plotting library (the client processes never plot). At 2,000 one-speaker clients one mark
per client is unreadable (and a bar chart 1,000 inches wide)."""

MANY_CLIENTS = 40
