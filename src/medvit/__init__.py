"""medvit: fine-tune Vision Transformers for medical image classification."""

import os

# Busy-waiting OpenMP threads steal cores from DataLoader workers and from other ranks on CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
