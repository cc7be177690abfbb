"""Run neural style transfer: ``python cli.py fit --config configs/default.yaml``."""

from nst_lightning.main import cli_main

if __name__ == "__main__":
    cli_main()
