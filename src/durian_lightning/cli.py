"""Console entry point ``durian``.

The LightningCLI (``durian fit|validate|test|predict``) arrives with the training module; until then the command
says so and exits with status 2 rather than pretending to train.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "durian: the training CLI (durian fit / validate) is not available yet in this version; "
        "the math core is importable from durian_lightning.advantages, .difficulty, .losses and .rewards.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
