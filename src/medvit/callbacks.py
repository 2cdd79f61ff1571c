"""The fine-tuning callback's old import path, which configs saved before 0.2 name.

A run folder's ``config.yaml`` from before the code moved to ``medvit.train`` holds
``class_path: medvit.callbacks.ViTFinetuning``; resuming it (``-c <run>/config.yaml``) must
still find the class.
"""

from medvit.train.callbacks import ViTFinetuning

__all__ = ["ViTFinetuning"]
