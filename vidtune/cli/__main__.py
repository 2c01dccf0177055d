"""``python -m vidtune.cli ...``: the ``vidtune`` dispatcher."""
import sys

from . import main

sys.exit(main())
