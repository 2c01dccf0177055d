"""``python -m vidtune.train config.toml``: ``vidtune-train``, the form torchrun launches
(``torchrun --nproc_per_node=N -m vidtune.train config.toml``)."""
import sys

from ..cli.train import main

sys.exit(main())
