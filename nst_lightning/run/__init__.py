"""One Lightning run: the optimisation of one image, driven by Lightning's ``Trainer``.

Rooms: ``module`` (the LightningModule: the image parameter and the training step), ``closure`` (one
evaluation: loss and gradient), ``precision`` (mixed precision around it), ``data`` (the images at each size),
``callbacks`` (snapshots, TensorBoard, the final image), ``losslog`` (losses logged off the critical path),
``guard`` (a run that stalls or diverges), ``checkpoint`` (atomic saves, resume), ``runlog`` (the run's
folder), ``memory`` and ``activations`` (will it fit), ``checks`` (a run's settings, checked before it
starts) and ``runtime`` (the machine). A second model (a feed-forward network) would live beside ``module``.
"""
