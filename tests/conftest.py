"""Test-wide settings."""

import torch

# The tests use tiny models, for which one thread is fastest; more threads only contend with the
# subprocesses some tests start (measured: a tiny training run took 44 s on 2 threads under load, 1.7 s on 1).
torch.set_num_threads(1)
