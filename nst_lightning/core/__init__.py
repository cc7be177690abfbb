"""The maths of neural style transfer, free of Lightning, jsonargparse and Pillow (a test checks it).

Rooms: ``losses`` (pure functions: Gram, content, mean/covariance, total variation, temporal), ``targets``
(thin modules over them, holding fixed statistics), ``color`` (colour transfer), ``backbones`` (the network
registry and weight loading) and ``weight_files`` (which network a state dict is), ``features`` (the frozen
extractor: an image in, ``{layer_name: activation}`` out), ``inputs`` (the images of one optimisation),
``objective`` (targets + weights -> named losses), ``tiles`` (where tiles lie) and ``tiling`` (the objective
over them), ``schedule`` (coarse-to-fine sizes) and ``lbfgs`` (the optimiser that never waits for the host).

A new loss goes in ``losses`` (its maths) and ``targets`` (its module); a new backbone in ``backbones``.
"""
