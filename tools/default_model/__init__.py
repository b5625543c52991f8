"""Build pdbus's built-in default model (native/default_model): corpus, training, evaluation."""

import os

# Idle OpenMP threads sleep instead of spinning: on a small shared CPU a spinning thread waits for a
# descheduled peer and a 2-thread step gets ~10x slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
