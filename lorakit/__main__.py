"""`python -m lorakit` is the `lorakit` console script."""

from lorakit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
