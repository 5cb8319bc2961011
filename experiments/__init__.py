"""Hydra entry points (``python -m experiments.<name>``)."""

import os

# Transparent huge pages for torch's large CPU allocations, which are slow on small VMs (the
# fused meta-training outer step took 8% less time with them; see README "Speed"). Read by torch
# when it first allocates, so it is set before any experiment imports torch; an explicit
# setting in the environment wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
