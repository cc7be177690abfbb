"""The command line: ``fit`` (``fit``: the LightningCLI of one run, settings only), the one-shot form
(``oneshot``: ``nst-lightning PHOTO PAINTING -o OUT``), its parsing helpers (``parsing``) and the shipped
configs (``configs``). The checks that answer before torch loads are in :mod:`nst_lightning.cli.early`."""
