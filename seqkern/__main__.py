"""`python -m seqkern info` / `python -m seqkern bench`: the same as the `seqkern` console script."""
import sys

from .cli import main

sys.exit(main())
