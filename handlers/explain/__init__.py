"""Explanation methods, one module each.

Forward methods turn the activations of the very run that produced the prediction into maps
``(N, h, w)`` in [0, 1] at the layer's native resolution; :func:`handlers.explain.lafam.resize_maps`
brings them to the size a request asks for.
"""
