"""Peak memory of lm_head + loss (forward + backward) on CPU, for a 1B-like vocabulary and hidden size:
  plain         lm_head, then trainer.model.lm_loss (an fp32 copy of the whole micro-batch's logits)
  chunked       lm_head, then trainer.loss.chunked_lm_loss (fp32 for one chunk of tokens at a time)
  fused_linear  trainer.loss.fused_linear_lm_loss (parallel.lm_loss=fused_linear): no logits beyond one chunk

    python bench/bench_loss_memory.py                               # 2 × 2048 tokens, vocab 32,000, hidden 2048, bf16
    python bench/bench_loss_memory.py --tokens 16384                # the 1B micro-batch (8 × 2048)

Each runs in a fresh process (so one cannot inherit the other's freed pages): the hidden states and lm_head's weight
are allocated and touched first, then the process' resident set is read, lm_head + loss run forward and backward,
and the peak resident set (ru_maxrss) minus that baseline is their own peak. All three include the gradients of the
hidden states and of the weight, which every variant produces. Not a timed test: memory only.
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
KINDS = ("plain", "chunked", "fused_linear")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(kind: str, tokens: int, vocab: int, hidden_size: int, dtype_name: str) -> dict:
    import torch

    from trainer.loss import chunked_lm_loss, fused_linear_lm_loss
    from trainer.model import lm_loss

    torch.set_num_threads(1)
    dtype = getattr(torch, DTYPES[dtype_name])
    generator = torch.Generator().manual_seed(0)
    # (T, B=2, H) as the final norm returns it, and lm_head's (V, H) weight, both touched and drawn in their own
    # dtype: an fp32 draw cast down would set a peak before the loss that hides the loss' own.
    hidden = torch.empty(tokens // 2, 2, hidden_size, dtype=dtype).normal_(generator=generator).requires_grad_()
    weight = torch.empty(vocab, hidden_size, dtype=dtype).normal_(0, 0.02, generator=generator).requires_grad_()
    labels = torch.randint(0, vocab, (2, tokens // 2), generator=generator)

    def head_and_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # h: (T, B, H), y: (B, T)
        if kind == "fused_linear":
            return fused_linear_lm_loss(h.transpose(0, 1), weight, y, vocab)
        logits = (h @ weight.t()).transpose(0, 1)  # (B, T, V) view of the (T, B, V) logits, as Llama returns them
        return (chunked_lm_loss if kind == "chunked" else lm_loss)(logits, y, vocab)

    warm = head_and_loss(hidden[:4], labels[:, :4])  # first-call allocations outside the peak
    warm.backward()
    hidden.grad = weight.grad = None
    baseline = rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = head_and_loss(hidden, labels)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if peak <= peak_before:
        raise SystemExit(f"the process peak ({peak_before / 2**20:.0f} MiB) was set before the loss ran: the loss' "
                         "own peak is hidden; allocate less before the baseline")
    return {"kind": kind, "loss": loss.item(), "baseline_rss_mib": baseline / 2**20,
            "peak_before_loss_above_baseline_mib": (peak_before - baseline) / 2**20,
            "peak_above_baseline_mib": (peak - baseline) / 2**20,
            "logits_mib": tokens * vocab * hidden.element_size() / 2**20,
            "fp32_logits_mib": tokens * vocab * 4 / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the micro-batch (B × T)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (lm_head's input)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of hidden states and weight")
    parser.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.tokens, args.vocab, args.hidden, args.dtype)))
        return 0
    rows = []
    for kind in KINDS:
        done = subprocess.run([sys.executable, __file__, "--one", kind, "--tokens", str(args.tokens), "--vocab",
                               str(args.vocab), "--hidden", str(args.hidden), "--dtype", args.dtype],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"lm_head + loss of {args.tokens} tokens x hidden {args.hidden} x vocab {args.vocab}, {args.dtype} "
          f"(logits {rows[0]['logits_mib']:.0f} MiB; as fp32 {rows[0]['fp32_logits_mib']:.0f} MiB)")
    print(f"{'loss':<14}{'peak above baseline MiB':>26}{'value':>12}")
    for row in rows:
        print(f"{row['kind']:<14}{row['peak_above_baseline_mib']:>26.0f}{row['loss']:>12.6f}")
    plain_mib = rows[0]["peak_above_baseline_mib"]
    report = {"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "dtype": args.dtype, "rows": rows,
              "ratio_chunked_over_plain": rows[1]["peak_above_baseline_mib"] / plain_mib,
              "ratio_fused_linear_over_plain": rows[2]["peak_above_baseline_mib"] / plain_mib}
    out = REPO / "bench" / "out" / "bench_loss_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"peak vs plain: chunked {report['ratio_chunked_over_plain']:.2f}, fused_linear "
          f"{report['ratio_fused_linear_over_plain']:.2f}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
