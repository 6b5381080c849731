"""dsmesh: the controller-side Python API (ansible-runner) and the small programs the nodes run
for preflight (probe, all-reduce). The training package itself is `train/`."""
