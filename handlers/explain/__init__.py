"""Explanation methods, one module each.

Forward methods (:mod:`.lafam`) turn the activations of the very run that produced the prediction into
maps ``(N, h, w)`` in [0, 1] at the layer's native resolution; :func:`handlers.explain.lafam.resize_maps`
brings them to the size a request asks for. Backward methods need the eager model and autograd:
:mod:`.lrp` (label-free or per-class LRP), :mod:`.gradients` (Grad-CAM with its closed form, input ×
gradient) and :mod:`.distribution` (attribution distributions over several classes).
"""
