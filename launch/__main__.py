"""`python -m launch ...` is the same as the `pretrain` console command."""

from launch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
