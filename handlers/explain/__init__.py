"""Explanation methods, one module each.

Forward methods (:mod:`.lafam`) turn the activations of the very run that produced the prediction into
maps ``(N, h, w)`` in [0, 1] at the layer's native resolution; :func:`handlers.explain.lafam.resize_maps`
brings them to the size a request asks for. Backward methods need the eager model and autograd:
:mod:`.lrp` (label-free or per-class LRP), :mod:`.gradients` (Grad-CAM with its closed form, input ×
gradient) and :mod:`.distribution` (attribution distributions over several classes).

These are the algorithms; :mod:`handlers.methods` wraps each served method in the one contract (and
registry) that options, service, encoder and evaluation read.
"""
