"""Kept so that old commands work: `python experiments/report.py ARGS` is `python -m medvr.report ARGS`."""

from medvr.report import main

if __name__ == "__main__":
    main()
