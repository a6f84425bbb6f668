"""`python -m pipeline [hydra overrides]`: see README.md."""

from pipeline.cli import main

if __name__ == "__main__":
    main()
