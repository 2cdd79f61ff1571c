"""Explanations of ViT predictions: attention rollout, gradient-weighted rollout and Grad-CAM.

- :mod:`~medvit.explain.attention`: the attention matrices, captured only while explaining.
- :mod:`~medvit.explain.methods`: the three methods, token relevance to maps in [0, 1].
- :mod:`~medvit.explain.overlay`: overlay pictures (image, heat map, blend).
- :mod:`~medvit.explain.run`: ``medvit explain`` and ``medvit predict --explain``'s work.
- :mod:`~medvit.explain.gallery`: the report's "explained" gallery, written at test time.
- :mod:`~medvit.explain.cli`: the ``medvit explain`` command line.
"""
