"""Flower's processes, as fedhubert starts and stops them: the SuperLink and SuperNode daemons of a deployment
(`deploy`), the runner that starts a run with `flwr run` and follows it (`federation`), the watchdog that ends a
simulation its command left behind (`reaper`), and the share of the machine each simulated client gets
(`resources`)."""
