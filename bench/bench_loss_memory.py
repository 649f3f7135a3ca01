"""Peak memory of the loss (forward + backward) on CPU: the plain loss (trainer.model.lm_loss, fp32 copy of the whole
micro-batch's logits) against the chunked one (trainer.loss.chunked_lm_loss), for a 1B-like vocabulary.

    python bench/bench_loss_memory.py                               # 2 × 2048 tokens, vocab 32,000, bf16 logits
    python bench/bench_loss_memory.py --tokens 16384 --dtype fp32   # the 1B micro-batch (8 × 2048) in fp32

Each loss runs in a fresh process (so one cannot inherit the other's freed pages): the logits are allocated and
touched first, then the process' resident set is read, the loss runs forward and backward, and the peak resident set
(ru_maxrss) minus that baseline is the loss' own peak. Both include the logits' gradient (one tensor of the logits'
dtype, which autograd produces either way); the difference is the fp32 working set. Not a timed test: memory only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(kind: str, tokens: int, vocab: int, dtype_name: str) -> dict:
    import torch

    from trainer.loss import chunked_lm_loss
    from trainer.model import lm_loss

    torch.set_num_threads(1)
    dtype = getattr(torch, DTYPES[dtype_name])
    generator = torch.Generator().manual_seed(0)
    # (T, B=2, V) as Llama returns it, touched. B > 1: with a size-1 dim the gradient's strides can differ from the
    # leaf's, and autograd would then copy it into .grad (a copy the real model, whose logits are no leaf, never makes).
    # Drawn in its own dtype: an fp32 draw cast down would set a peak before the loss that hides the loss' own.
    logits = torch.empty(tokens // 2, 2, vocab, dtype=dtype).normal_(generator=generator).requires_grad_()
    labels = torch.randint(0, vocab, (2, tokens // 2), generator=generator)
    loss_fn = chunked_lm_loss if kind == "chunked" else lm_loss
    warm = loss_fn(logits[:4].transpose(0, 1), labels[:, :4], vocab)  # first-call allocations outside the peak
    warm.backward()
    logits.grad = None
    baseline = rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = loss_fn(logits.transpose(0, 1), labels, vocab)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if peak <= peak_before:
        raise SystemExit(f"the process peak ({peak_before / 2**20:.0f} MiB) was set before the loss ran: the loss' "
                         "own peak is hidden; allocate less before the baseline")
    return {"kind": kind, "loss": loss.item(), "baseline_rss_mib": baseline / 2**20,
            "peak_before_loss_above_baseline_mib": (peak_before - baseline) / 2**20,
            "peak_above_baseline_mib": (peak - baseline) / 2**20,
            "logits_mib": logits.numel() * logits.element_size() / 2**20,
            "fp32_logits_mib": logits.numel() * 4 / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the micro-batch (B × T)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the logits")
    parser.add_argument("--one", choices=["plain", "chunked"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.tokens, args.vocab, args.dtype)))
        return 0
    rows = []
    for kind in ("plain", "chunked"):
        done = subprocess.run([sys.executable, __file__, "--one", kind, "--tokens", str(args.tokens), "--vocab",
                               str(args.vocab), "--dtype", args.dtype], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"loss of {args.tokens} tokens x vocab {args.vocab}, {args.dtype} logits "
          f"({rows[0]['logits_mib']:.0f} MiB; as fp32 {rows[0]['fp32_logits_mib']:.0f} MiB)")
    print(f"{'loss':<10}{'peak above baseline MiB':>26}{'value':>12}")
    for row in rows:
        print(f"{row['kind']:<10}{row['peak_above_baseline_mib']:>26.0f}{row['loss']:>12.6f}")
    report = {"tokens": args.tokens, "vocab": args.vocab, "dtype": args.dtype, "rows": rows,
              "ratio_chunked_over_plain": rows[1]["peak_above_baseline_mib"] / rows[0]["peak_above_baseline_mib"]}
    out = REPO / "bench" / "out" / "bench_loss_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"chunked / plain peak: {report['ratio_chunked_over_plain']:.2f}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
