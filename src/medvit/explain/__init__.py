"""Explanations of ViT predictions: attention rollout, gradient-weighted rollout and Grad-CAM.

- :mod:`~medvit.explain.attention`: the attention matrices, captured only while explaining.
- :mod:`~medvit.explain.methods`: the three methods, token relevance to maps in [0, 1].
- :mod:`~medvit.explain.overlay`: overlay pictures (image, heat map, blend).
- :mod:`~medvit.explain.run`: ``medvit explain`` and ``medvit predict --explain``'s work.
- :mod:`~medvit.explain.gallery`: the report's "explained" gallery, written at test time.
- :mod:`~medvit.explain.cli`: the ``medvit explain`` command line.
"""

#: The explanation methods (:mod:`~medvit.explain.methods`); names only, so no torch here.
METHODS = ("rollout", "grad_rollout", "gradcam")
#: What the sanity checks of tests/test_explain_sanity.py showed (README, "Explanations"):
#: the methods whose map peaks fall on the mark that decides a synthetic set's label, and those
#: whose maps change when the trained weights are re-initialised (Adebayo et al., 2018).
#: Grad-CAM on ViT tokens passed each only in some setups, and claims neither.
LOCALISING = ("rollout", "grad_rollout")
RANDOMISATION_SENSITIVE = ("rollout", "grad_rollout")
HEAD_FUSIONS = ("mean", "max", "min")
