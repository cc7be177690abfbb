"""``python -m nst_lightning fit --config configs/default.yaml``: the same as ``python cli.py``."""

from nst_lightning.main import cli_main

if __name__ == "__main__":
    cli_main()
