"""``python -m deformable.data [--preset NAME] [--out-dir DIR] [--seed N]``: generate a deformed-fashion
preset (if not cached) and print where it is and its statistics."""

from .deformed_fashion import _main

_main()
