"""`pretrain report`: summarize one or more runs from their metrics.jsonl and draw their curves into one PNG
(loss with validation points, learning rate, grad norm, tokens/s, TFLOP/s per GPU, MFU when recorded, data wait),
several runs overlaid. Reads only the run directory: no torch, works on a copy of a finished or running run."""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = """\
examples:
  pretrain report runs/tiny                                   # table on stdout, curves in runs/tiny/report.png
  pretrain report runs/tiny --smooth 10 --x tokens            # loss averaged over 10 log points, x = tokens seen
  pretrain report runs/lr3e-4 runs/lr1e-3 --output lr_sweep.png   # compare runs: one colour each, one legend
  pretrain report runs/7b --x time                            # x = wall time (restarts' downtime left out)

A worked example: after `pretrain train --config configs/tiny.yaml logging.run_dir=runs/tiny` and a second run with
`optim.lr=3e-3 logging.run_dir=runs/tiny_lr3e-3`, `pretrain report runs/tiny runs/tiny_lr3e-3` prints one column per
run (steps, tokens seen, first/last/min loss, last val loss and perplexity, mean tokens/s without the first log
line's warm-up, mean MFU when recorded, wall time, NaN losses) and writes both runs' curves to runs/tiny/report.png.
Malformed lines in metrics.jsonl (a run killed mid-write) are skipped, named on stderr and counted in the table.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="summary table and training curves (PNG) of one or more run directories",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directory holding metrics.jsonl (logging.run_dir, default runs/<config name>)")
    parser.add_argument("--output", metavar="PNG",
                        help="where to write the figure (default: <first RUN_DIR>/report.png)")
    parser.add_argument("--smooth", type=int, default=1, metavar="N",
                        help="plot the train loss as a trailing mean over N log points, raw curve faint behind it "
                             "(default: %(default)s = no smoothing)")
    parser.add_argument("--x", choices=("step", "tokens", "time"), default="step",
                        help="x axis: optimizer step, tokens seen, or wall time (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: registering must stay light for `--help` (matplotlib loads only to draw the figure).
    from trainer.report import write_report

    write_report(args.run_dirs, args.output, smooth_points=args.smooth, x_axis=args.x)
    return 0
