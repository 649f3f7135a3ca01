"""prepare throughput vs raw sentencepiece (steady state, fixed cost apart), scaling with num_proc, peak memory.

Same text, same run: a corpus of real code (this Python's stdlib .py files, as JSON Lines) is written once; then
  raw       `Tokenizer.encode` (sentencepiece, one thread) over the documents already in memory, in 256-document
            batches: the ceiling for one process (no reading, no JSON, no writing)
  raw xN    the same split over N forked processes at once: what N independent tokenizing processes get out of
            this machine (shared caches and memory bandwidth; on a VM, vCPUs may be SMT siblings)
  prepare   the whole `prepare()` on the files (read + JSON + tokenize + eos + pack + tar + sha256 + fsync), for
            each --num-proc
  fixed     `prepare()` on a tiny corpus (a few documents, one sample): start-up and tear-down that do not grow
            with the input (tokenizer load, worker start, manifest, report); its few tokens are subtracted at
            the raw rate
Steady-state throughput = tokens / (elapsed - fixed): what a long run sustains. Per-process ratio = steady
throughput / (num_proc × raw): 1.0 means every process tokenizes as fast as raw sentencepiece does alone; "vs raw
xN" compares with N raw processes run at once instead, which separates prepare's own overhead from the machine's.
CPU cost ratio = raw CPU s / prepare CPU s for the same tokens (all processes, start-up excluded): the per-core
cost, which the other jobs on a shared machine disturb less than wall time. Encode share (num_proc=1) = time
inside sentencepiece / steady-state time of the same prepare run: the per-core efficiency without comparing two
runs, so the ±10 % that neighbours' load puts on sentencepiece's own speed cancels out.
Main-process ceiling (num_proc > 1) = tokens / CPU s of the main process (reading, packing, writing, IPC): no
number of workers goes faster, so this is where scaling stops on a many-core node.
Each timing is the best of --repeats interleaved runs (the best run is the least disturbed one).
Target: per-process ratio >= 0.85 for every num_proc up to the cores available.

Where the rest goes (`overheads_alone`, each timed alone on the same corpus): reading raw blocks (main process),
parsing + validating them (workers), writing the shards (main process).

Peak memory: `prepare` runs in a child process on each --rss-mb corpus size; the high-water RSS of the main
process and of the largest worker should not grow with the corpus (input streams through; nothing holds it).

    python bench/bench_prepare.py --quick                   # ~1 min: 8 MB corpus, unigram only, RSS on 16/64 MB
    python bench/bench_prepare.py                           # 40 MB, BPE and unigram, num_proc 1 2, RSS 100/400 MB
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer

RAW_BATCH_DOCS = 256
OUT_DIR = Path(__file__).resolve().parent / "out"
SEQ_LEN = 2048


class Timing:
    """Best-of-N seconds of one variant: wall, CPU of this process (all its threads) and CPU of its children; and
    the seconds this process spent inside `Tokenizer.encode` during the fastest run."""

    def __init__(self) -> None:
        self.wall_s = self.own_cpu_s = self.cpu_s = float("inf")
        self.encode_s = 0.0
        self.num_tokens = 0

    def measure(self, run: Callable[[], int]) -> None:
        own_start, children_start = _cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN)
        with _encode_clock() as encode_clock:
            wall_start = time.perf_counter()
            self.num_tokens = run()
            wall_s = time.perf_counter() - wall_start
        if wall_s < self.wall_s:
            self.wall_s, self.encode_s = wall_s, encode_clock[0]
        own_s = _cpu_seconds(resource.RUSAGE_SELF) - own_start
        self.own_cpu_s = min(self.own_cpu_s, own_s)
        self.cpu_s = min(self.cpu_s, own_s + _cpu_seconds(resource.RUSAGE_CHILDREN) - children_start)


@contextlib.contextmanager
def _encode_clock() -> Iterator[list[float]]:
    """Adds up the seconds spent in `Tokenizer.encode` in this process (prepare runs inline with num_proc=1).

    The share of prepare's time spent encoding is measured within one run, so a neighbour's load that slows
    sentencepiece slows both sides of it: unlike prepare vs a separate raw run, it does not swing by ±10 %."""
    total = [0.0]
    original = Tokenizer.encode

    def timed(tokenizer: Tokenizer, *args: Any, **kwargs: Any) -> Any:
        start_s = time.perf_counter()
        try:
            return original(tokenizer, *args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start_s

    Tokenizer.encode = timed  # type: ignore[method-assign]
    try:
        yield total
    finally:
        Tokenizer.encode = original  # type: ignore[method-assign]


def _cpu_seconds(who: int) -> float:
    # Pool workers are joined when prepare() returns, so RUSAGE_CHILDREN holds their CPU time by then.
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def stdlib_documents() -> list[str]:
    """Every .py file of the running Python's stdlib (about 30 MB of real code), in sorted order."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(text)
    return docs


def write_corpus(path: Path, docs: list[str], target_bytes: int, files: int = 4, input_format: str = "jsonl") -> int:
    """Cycle through `docs` into `files` JSON Lines files until `target_bytes` of text; returns the text bytes.
    `input_format` jsonl.zst / parquet / arrow converts each file afterwards (row groups or batches of 1000
    documents)."""
    path.mkdir(parents=True, exist_ok=True)
    total_bytes, index = 0, 0
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(path / f"part-{i:02d}.jsonl", "w", encoding="utf-8"))
                   for i in range(files)]
        while total_bytes < target_bytes:
            doc = docs[index % len(docs)]
            handles[index % files].write(json.dumps({"text": doc}) + "\n")
            total_bytes += len(doc.encode("utf-8"))
            index += 1
    if input_format != "jsonl":
        for part in sorted(path.glob("part-*.jsonl")):
            _convert(part, input_format)
    return total_bytes


def _convert(part: Path, input_format: str) -> None:
    if input_format == "jsonl.zst":
        import zstandard

        part.with_suffix(".jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(part.read_bytes()))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        texts = [json.loads(line)["text"] for line in part.read_text(encoding="utf-8").splitlines()]
        table = pa.table({"text": texts})
        if input_format == "parquet":
            pq.write_table(table, part.with_suffix(".parquet"), row_group_size=1000)
        else:  # arrow: the IPC stream format in 1000-row batches, as HF datasets' save_to_disk writes it
            with pa.ipc.new_stream(str(part.with_suffix(".arrow")), table.schema) as writer:
                writer.write_table(table, max_chunksize=1000)
    part.unlink()


def corpus_glob(input_format: str) -> str:
    return f"part-*.{input_format}"


def read_corpus(path: Path, input_format: str) -> list[str]:
    from data_pipeline.sources import iter_documents

    return [doc.text for doc in iter_documents([path], include_globs=[corpus_glob(input_format)])]


def run_raw(tokenizer: Tokenizer, docs: list[str]) -> int:
    num_tokens = 0
    for i in range(0, len(docs), RAW_BATCH_DOCS):
        num_tokens += sum(len(ids) + 1 for ids in tokenizer.encode(docs[i : i + RAW_BATCH_DOCS], num_threads=1))
    return num_tokens


def run_raw_parallel(tokenizer: Tokenizer, docs: list[str], num_proc: int) -> int:
    """raw in `num_proc` processes at once (forked), each on a contiguous share of the documents: the most that
    many independent sentencepiece processes get out of this machine, which shares caches and memory bandwidth
    (and, on a VM, may give SMT siblings as vCPUs). Scaling is judged against this as well as against n × raw."""
    bounds = [len(docs) * i // num_proc for i in range(num_proc + 1)]
    read_fd, write_fd = os.pipe()
    children = []
    for i in range(1, num_proc):
        pid = os.fork()
        if pid == 0:  # child: report its token count through the pipe, never return into the benchmark
            try:
                os.write(write_fd, f"{run_raw(tokenizer, docs[bounds[i] : bounds[i + 1]])}\n".encode())
            finally:
                os._exit(0)
        children.append(pid)
    os.close(write_fd)
    num_tokens = run_raw(tokenizer, docs[: bounds[1]])
    for pid in children:
        os.waitpid(pid, 0)  # waited-for children count in RUSAGE_CHILDREN, so their CPU time is measured
    with os.fdopen(read_fd) as pipe:
        return num_tokens + sum(int(line) for line in pipe)


def run_prepare(corpus: Path, tokenizer_dir: Path, out: Path, num_proc: int, input_format: str = "jsonl") -> int:
    result = prepare(PrepareConfig(inputs=(str(corpus),), include_globs=(corpus_glob(input_format),),
                                   tokenizer=str(tokenizer_dir),
                                   output_dir=str(out), seq_len=SEQ_LEN, num_proc=num_proc, overwrite=True,
                                   progress=False))
    split = result.manifest.split("train")
    return split.num_tokens + split.dropped_tail_tokens


def time_overheads(corpus: Path, num_tokens: int, work: Path, input_format: str) -> dict[str, float]:
    """The non-tokenizer costs of prepare, each alone: cutting the input into blocks (the main process: for
    uncompressed files byte ranges only, else reading and decompressing), parsing them (workers: for byte
    ranges also reading), writing the shards (workers)."""
    import numpy as np

    from data_pipeline.shards import ShardSetWriter
    from data_pipeline.sources import RecordBlock, expand_inputs, parse_block, read_blocks

    files = expand_inputs([corpus], [corpus_glob(input_format)])
    start_s = time.perf_counter()
    items = list(read_blocks(files, "text", PrepareConfig.batch_max_docs, PrepareConfig.batch_max_bytes,
                             byte_ranges=True))
    read_s = time.perf_counter() - start_s
    start_s = time.perf_counter()
    for block in items:
        if isinstance(block, RecordBlock):
            for _ in parse_block(block, "text"):
                pass
    parse_s = time.perf_counter() - start_s
    samples = np.random.default_rng(0).integers(0, 8000, size=(num_tokens // (SEQ_LEN + 1), SEQ_LEN + 1),
                                                dtype=np.uint16)
    start_s = time.perf_counter()
    with ShardSetWriter(work / "write-only", "train", 1000, "uint16", SEQ_LEN + 1) as writer:
        writer.write_batch(samples)
    return {"read_blocks_s": round(read_s, 3), "parse_s": round(parse_s, 3),
            "shard_write_s": round(time.perf_counter() - start_s, 3), "num_samples_written": len(samples)}


def bench_model_type(model_type: str, corpus: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    tokenizer_dir = work / f"tok-{model_type}"
    start_s = time.perf_counter()
    train_tokenizer(TokenizerTrainConfig(inputs=(str(corpus),), include_globs=(corpus_glob(args.input_format),),
                                         output_dir=str(tokenizer_dir), vocab_size=args.vocab_size,
                                         model_type=model_type, input_sentence_size=args.train_sentences,
                                         num_threads=2, overwrite=True))
    train_s = time.perf_counter() - start_s
    tokenizer = Tokenizer.load(tokenizer_dir)
    docs = read_corpus(corpus, args.input_format)
    tiny = work / "tiny"
    # Enough for one sample: prepare refuses a dataset without one.
    write_corpus(tiny, docs, 40_000, files=1, input_format=args.input_format)
    runs: dict[str, Callable[[], int]] = {"raw": lambda: run_raw(tokenizer, docs)}
    for n in args.num_proc:
        if n > 1:
            runs[f"raw_x{n}"] = lambda n=n: run_raw_parallel(tokenizer, docs, n)
        runs[f"prepare_np{n}"] = lambda n=n: run_prepare(corpus, tokenizer_dir, work / "ds", n, args.input_format)
        runs[f"fixed_np{n}"] = lambda n=n: run_prepare(tiny, tokenizer_dir, work / "ds-tiny", n, args.input_format)
    timings = {name: Timing() for name in runs}
    for _ in range(args.repeats):  # interleaved, so a burst of load from other jobs hits every variant alike
        for name, run in runs.items():
            timings[name].measure(run)
    summary = summarize(model_type, args.num_proc, timings)
    summary["tokenizer_train_s"] = round(train_s, 1)
    summary["overheads_alone"] = time_overheads(corpus, timings["raw"].num_tokens, work, args.input_format)
    return summary


def summarize(model_type: str, num_procs: list[int], timings: dict[str, Timing]) -> dict[str, Any]:
    raw = timings["raw"]
    raw_rate = raw.num_tokens / raw.wall_s
    rows: dict[str, dict[str, Any]] = {}
    for n in num_procs:
        run, fixed = timings[f"prepare_np{n}"], timings[f"fixed_np{n}"]
        parallel_raw = timings.get(f"raw_x{n}", raw)
        for other in (run, parallel_raw):
            assert other.num_tokens == raw.num_tokens, f"{other.num_tokens} tokens, raw {raw.num_tokens}"
        # The tiny corpus still tokenizes a few thousand tokens; they are not start-up cost.
        fixed_s = max(fixed.wall_s - fixed.num_tokens / raw_rate, 0.0)
        fixed_cpu_s = max(fixed.cpu_s - fixed.num_tokens / raw_rate, 0.0)
        steady_rate = run.num_tokens / (run.wall_s - fixed_s)
        rows[f"np{n}"] = {
            "elapsed_s": round(run.wall_s, 3), "fixed_s": round(fixed_s, 3),
            "tokens_per_s_overall": round(run.num_tokens / run.wall_s),
            "tokens_per_s_steady": round(steady_rate),
            "per_process_vs_raw": round(steady_rate / (n * raw_rate), 3),
            # Inline (np1) only: the part of the steady-state time spent in sentencepiece, i.e. the per-core
            # efficiency, with the encode time measured inside the same run.
            "encode_share": round(run.encode_s / (run.wall_s - fixed_s), 3) if n == 1 else None,
            "raw_parallel_tokens_per_s": round(raw.num_tokens / parallel_raw.wall_s),
            "vs_raw_parallel": round(steady_rate * parallel_raw.wall_s / raw.num_tokens, 3),
            "cpu_s": round(run.cpu_s, 3), "fixed_cpu_s": round(fixed_cpu_s, 3),
            "cpu_cost_vs_raw": round(raw.cpu_s / (run.cpu_s - fixed_cpu_s), 3),
            "cpu_cost_vs_raw_parallel": round(parallel_raw.cpu_s / (run.cpu_s - fixed_cpu_s), 3),
            # With workers, the main process cuts tasks (reading only compressed inputs), plans shards and numbers
            # bad records: its CPU time per token bounds what any number of workers can reach (one core for it,
            # its threads not overlapping: a conservative bound).
            "main_process_cpu_s": round(run.own_cpu_s - fixed.own_cpu_s, 3),
            # Floored at 1 ms (the clock's useful resolution here): then the ceiling is a lower bound.
            "main_process_ceiling_tokens_per_s": (round(run.num_tokens / max(run.own_cpu_s - fixed.own_cpu_s, 1e-3))
                                                  if n > 1 else None),
        }
    return {"model_type": model_type, "num_tokens": raw.num_tokens,
            "raw": {"elapsed_s": round(raw.wall_s, 3), "tokens_per_s": round(raw_rate), "cpu_s": round(raw.cpu_s, 3)},
            "prepare": rows}


def measure_rss(corpus_mb: int, tokenizer_dir: Path, work: Path, docs: list[str], num_proc: int,
                input_format: str) -> dict[str, Any]:
    corpus = work / f"rss-{corpus_mb}mb"
    text_bytes = write_corpus(corpus, docs, corpus_mb * 10**6, input_format=input_format)
    code = (
        "import json, resource, sys\n"
        "from data_pipeline.prepare import PrepareConfig, prepare\n"
        f"r = prepare(PrepareConfig(inputs=({str(corpus)!r},), include_globs=({corpus_glob(input_format)!r},),"
        f" tokenizer={str(tokenizer_dir)!r},"
        f" output_dir={str(work / 'rss-out')!r}, seq_len={SEQ_LEN}, num_proc={num_proc}, overwrite=True,"
        " progress=False))\n"
        # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark across fork+exec into ru_maxrss.
        "hwm_kb = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "print(json.dumps({'main_kb': hwm_kb,"
        " 'worker_max_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
        " 'elapsed_s': r.elapsed_s, 'tokens': r.manifest.split('train').num_tokens}))\n"
    )
    repo_root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    for part in corpus.glob("part-*"):
        part.unlink()  # the next size needs the disk space
    return {"corpus_text_mb": round(text_bytes / 1e6, 1), "num_proc": num_proc,
            "peak_rss_main_mb": round(stats["main_kb"] / 1024, 1),
            "peak_rss_worker_max_mb": round(stats["worker_max_kb"] / 1024, 1),
            "elapsed_s": round(stats["elapsed_s"], 1), "num_tokens": stats["tokens"]}


def print_report(results: list[dict[str, Any]], rss: list[dict[str, Any]]) -> None:
    print(f"\n{'model':8} {'run':5} {'elapsed':>8} {'fixed':>6} {'Mtok/s':>7} {'Mtok/s':>7} {'per-proc':>8} "
          f"{'raw xN':>7} {'vs raw':>7} {'CPU cost':>8} {'CPU cost':>8}")
    print(f"{'':8} {'':5} {'s':>8} {'s':>6} {'overall':>7} {'steady':>7} {'vs raw':>8} {'Mtok/s':>7} {'xN':>7} "
          f"{'vs raw':>8} {'vs raw xN':>8}")
    for res in results:
        raw = res["raw"]
        print(f"{res['model_type']:8} {'raw':5} {raw['elapsed_s']:>8.3f} {'':>6} {raw['tokens_per_s'] / 1e6:>7.2f} "
              f"{raw['tokens_per_s'] / 1e6:>7.2f}")
        for name, row in res["prepare"].items():
            print(f"{res['model_type']:8} {name:5} {row['elapsed_s']:>8.3f} {row['fixed_s']:>6.3f} "
                  f"{row['tokens_per_s_overall'] / 1e6:>7.2f} {row['tokens_per_s_steady'] / 1e6:>7.2f} "
                  f"{row['per_process_vs_raw']:>8.3f} {row['raw_parallel_tokens_per_s'] / 1e6:>7.2f} "
                  f"{row['vs_raw_parallel']:>7.3f} {row['cpu_cost_vs_raw']:>8.3f} "
                  f"{row['cpu_cost_vs_raw_parallel']:>8.3f}")
        for name, row in res["prepare"].items():
            if row["encode_share"]:
                print(f"{res['model_type']:8} {name}: {row['encode_share']:.1%} of the steady-state time is "
                      "sentencepiece encode (measured inside the same run)")
            if row["main_process_ceiling_tokens_per_s"]:
                ceiling = row["main_process_ceiling_tokens_per_s"]
                print(f"{res['model_type']:8} {name}: main process CPU {row['main_process_cpu_s']:.3f} s -> "
                      f"ceiling {ceiling / 1e6:.1f} Mtok/s for any num_proc "
                      f"(= {ceiling / raw['tokens_per_s']:.1f} raw processes)")
        alone = res["overheads_alone"]
        print(f"{res['model_type']:8} alone: read blocks {alone['read_blocks_s']:.3f} s, parse "
              f"{alone['parse_s']:.3f} s, shard writing {alone['shard_write_s']:.3f} s "
              f"({alone['num_samples_written']} samples); raw encode {raw['elapsed_s']:.3f} s")
    if rss:
        print(f"\n{'corpus MB':>10} {'num_proc':>8} {'main peak MB':>13} {'worker peak MB':>15} {'elapsed_s':>10}")
        for row in rss:
            print(f"{row['corpus_text_mb']:>10} {row['num_proc']:>8} {row['peak_rss_main_mb']:>13} "
                  f"{row['peak_rss_worker_max_mb']:>15} {row['elapsed_s']:>10}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=float, default=40, help="text for the throughput runs (MB)")
    parser.add_argument("--model-types", nargs="+", default=["bpe", "unigram"], choices=["bpe", "unigram"])
    parser.add_argument("--input-format", default="jsonl", choices=["jsonl", "jsonl.zst", "parquet", "arrow"],
                        help="corpus files: jsonl (workers read byte ranges), jsonl.zst (the main process "
                             "decompresses), parquet (workers read row groups)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--train-sentences", type=int, default=200_000, help="tokenizer training sample (lines)")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-mb", type=int, nargs="*", default=[100, 400], help="corpus sizes for peak RSS")
    parser.add_argument("--rss-model-type", default="unigram", choices=["bpe", "unigram"],
                        help="tokenizer for the RSS runs (unigram: ~5x faster on code, same memory behaviour)")
    parser.add_argument("--quick", action="store_true", help="small smoke version (~2 min on 2 cores)")
    args = parser.parse_args()
    if args.quick:
        args.corpus_mb, args.model_types, args.train_sentences, args.repeats = 8, ["unigram"], 50_000, 2
        args.rss_mb = [16, 64]
    if args.rss_mb and args.rss_model_type not in args.model_types:
        args.model_types.append(args.rss_model_type)  # the RSS runs use the tokenizer trained here
    return args


def main() -> None:
    args = parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    docs = stdlib_documents()
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        text_bytes = write_corpus(corpus, docs, int(args.corpus_mb * 1e6), input_format=args.input_format)
        results = [bench_model_type(m, corpus, work, args) for m in args.model_types]
        rss = [measure_rss(mb, work / f"tok-{args.rss_model_type}", work, docs, max(args.num_proc), args.input_format)
               for mb in args.rss_mb]
    report = {"benchmark": "prepare", "host": platform.node(), "cpu_count": os.cpu_count(),
              "input_format": args.input_format,
              "load_avg_at_end": os.getloadavg(), "corpus_text_mb": round(text_bytes / 1e6, 1),
              "vocab_size": args.vocab_size, "repeats": args.repeats, "results": results, "peak_rss": rss,
              "target": "per_process_vs_raw >= 0.85 for each num_proc <= cores"}
    print_report(results, rss)
    out_path = OUT_DIR / f"bench_prepare_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
