"""prepare throughput vs raw sentencepiece, scaling with num_proc, and peak memory on a larger corpus.

Same text, same run: a corpus of real code (this Python's stdlib .py files, as JSON Lines) is written once; then
  raw       `Tokenizer.encode` (sentencepiece, one thread) over the documents already in memory, in the same
            256-document batches prepare uses: the ceiling for one process
  prepare   the whole `prepare()` on the files (read + JSON + tokenize + eos + pack + tar + sha256), num_proc=1, 2
Each timing is the best of --repeats runs (the machine is shared; the best run is the least disturbed one).
Target: prepare with num_proc=1 reaches >= 85 % of raw tokens/s.

Peak memory: `prepare` runs in a child process on two corpus sizes; ru_maxrss of the main process and of the
largest worker should not grow with the corpus (documents stream through; nothing holds the corpus).

    python bench/bench_prepare.py --quick                    # ~1-2 min: 8 MB corpus, BPE only, RSS on 16/48 MB
    python bench/bench_prepare.py --corpus-mb 40 --rss-mb 100 500 --model-types bpe unigram    # the full version
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer

BATCH_DOCS = PrepareConfig.batch_max_docs
OUT_DIR = Path(__file__).resolve().parent / "out"


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


def write_corpus(path: Path, docs: list[str], target_bytes: int, files: int = 4) -> int:
    """Cycle through `docs` into `files` JSON Lines files until `target_bytes` of text; returns the text bytes."""
    total_bytes, index = 0, 0
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(path / f"part-{i:02d}.jsonl", "w", encoding="utf-8"))
                   for i in range(files)]
        while total_bytes < target_bytes:
            doc = docs[index % len(docs)]
            handles[index % files].write(json.dumps({"text": doc}) + "\n")
            total_bytes += len(doc.encode("utf-8"))
            index += 1
    return total_bytes


def read_corpus(path: Path) -> list[str]:
    docs = []
    for part in sorted(path.glob("part-*.jsonl")):
        with open(part, encoding="utf-8") as fh:
            docs.extend(json.loads(line)["text"] for line in fh)
    return docs


def time_raw(tokenizer: Tokenizer, docs: list[str]) -> tuple[float, int]:
    start_s = time.perf_counter()
    num_tokens = 0
    for i in range(0, len(docs), BATCH_DOCS):
        num_tokens += sum(len(ids) + 1 for ids in tokenizer.encode(docs[i : i + BATCH_DOCS], num_threads=1))
    return time.perf_counter() - start_s, num_tokens


def time_prepare(corpus: Path, tokenizer_dir: Path, out: Path, num_proc: int) -> tuple[float, int]:
    start_s = time.perf_counter()
    result = prepare(PrepareConfig(inputs=(str(corpus),), include_globs=("*.jsonl",), tokenizer=str(tokenizer_dir),
                                   output_dir=str(out), seq_len=2048, num_proc=num_proc, overwrite=True,
                                   progress=False))
    elapsed_s = time.perf_counter() - start_s
    split = result.manifest.split("train")
    return elapsed_s, split.num_tokens + split.dropped_tail_tokens


def time_overheads(corpus: Path, num_tokens: int, work: Path) -> dict[str, float]:
    """The two non-tokenizer costs of prepare, alone: reading+parsing the documents, and writing the shards."""
    import numpy as np

    from data_pipeline.shards import ShardSetWriter
    from data_pipeline.sources import expand_inputs, iter_documents

    start_s = time.perf_counter()
    for _ in iter_documents(expand_inputs([corpus], ["*.jsonl"])):
        pass
    read_s = time.perf_counter() - start_s
    samples = np.random.default_rng(0).integers(0, 8000, size=(num_tokens // 2049, 2049), dtype=np.uint16)
    start_s = time.perf_counter()
    with ShardSetWriter(work / "write-only", "train", 1000, "uint16", 2049) as writer:
        writer.write_batch(samples)
    return {"read_parse_s": round(read_s, 3), "shard_write_s": round(time.perf_counter() - start_s, 3),
            "num_samples_written": len(samples)}


def bench_model_type(model_type: str, corpus: Path, work: Path, args: argparse.Namespace) -> dict[str, object]:
    tokenizer_dir = work / f"tok-{model_type}"
    start_s = time.perf_counter()
    train_tokenizer(TokenizerTrainConfig(inputs=(str(corpus),), include_globs=("*.jsonl",),
                                         output_dir=str(tokenizer_dir), vocab_size=args.vocab_size,
                                         model_type=model_type, input_sentence_size=args.train_sentences,
                                         num_threads=2, overwrite=True))
    train_s = time.perf_counter() - start_s
    tokenizer = Tokenizer.load(tokenizer_dir)
    docs = read_corpus(corpus)
    runs = {"raw": lambda: time_raw(tokenizer, docs)}
    for n in args.num_proc:
        runs[f"prepare_np{n}"] = lambda n=n: time_prepare(corpus, tokenizer_dir, work / "ds", n)
    best: dict[str, tuple[float, int]] = {}
    for _ in range(args.repeats):  # interleaved, so a burst of load from other jobs hits every variant alike
        for name, run in runs.items():
            elapsed_s, num_tokens = run()
            if name not in best or elapsed_s < best[name][0]:
                best[name] = (elapsed_s, num_tokens)
    summary = summarize(model_type, train_s, best)
    summary["overheads_alone"] = time_overheads(corpus, best["raw"][1], work)
    return summary


def summarize(model_type: str, train_s: float, best: dict[str, tuple[float, int]]) -> dict[str, object]:
    raw_s, raw_tokens = best["raw"]
    rows = {}
    for name, (elapsed_s, num_tokens) in best.items():
        assert num_tokens == raw_tokens, f"{name} produced {num_tokens} tokens, raw {raw_tokens}"
        rows[name] = {"elapsed_s": round(elapsed_s, 3), "tokens_per_s": round(num_tokens / elapsed_s),
                      "vs_raw_one_process": round(raw_s / elapsed_s, 3)}
    return {"model_type": model_type, "tokenizer_train_s": round(train_s, 1), "num_tokens": raw_tokens, "runs": rows}


def measure_rss(corpus_mb: int, tokenizer_dir: Path, work: Path, docs: list[str], num_proc: int) -> dict[str, object]:
    corpus = work / f"rss-{corpus_mb}mb"
    corpus.mkdir(exist_ok=True)
    text_bytes = write_corpus(corpus, docs, corpus_mb * 10**6)
    code = (
        "import json, resource, sys\n"
        "from data_pipeline.prepare import PrepareConfig, prepare\n"
        f"r = prepare(PrepareConfig(inputs=({str(corpus)!r},), include_globs=('*.jsonl',),"
        f" tokenizer={str(tokenizer_dir)!r},"
        f" output_dir={str(work / 'rss-out')!r}, seq_len=2048, num_proc={num_proc}, overwrite=True, progress=False))\n"
        # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark across fork+exec into ru_maxrss.
        "hwm_kb = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "print(json.dumps({'main_kb': hwm_kb,"
        " 'worker_max_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
        " 'elapsed_s': r.elapsed_s, 'tokens': r.manifest.split('train').num_tokens}))\n"
    )
    repo_root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"corpus_text_mb": round(text_bytes / 1e6, 1), "num_proc": num_proc,
            "peak_rss_main_mb": round(stats["main_kb"] / 1024, 1),
            "peak_rss_worker_max_mb": round(stats["worker_max_kb"] / 1024, 1),
            "elapsed_s": round(stats["elapsed_s"], 1), "num_tokens": stats["tokens"]}


def print_report(results: list[dict[str, object]], rss: list[dict[str, object]]) -> None:
    print(f"\n{'model':8} {'run':12} {'elapsed_s':>10} {'Mtok/s':>8} {'vs raw 1 proc':>14}")
    for res in results:
        for name, row in res["runs"].items():  # type: ignore[union-attr]
            print(f"{res['model_type']:8} {name:12} {row['elapsed_s']:>10.2f} {row['tokens_per_s'] / 1e6:>8.2f} "
                  f"{row['vs_raw_one_process']:>14.2f}")
        alone = res["overheads_alone"]
        print(f"{res['model_type']:8} (alone: read+parse {alone['read_parse_s']:.2f} s, shard writing "  # type: ignore[index]
              f"{alone['shard_write_s']:.2f} s for {alone['num_samples_written']} samples)")  # type: ignore[index]
    if rss:
        print(f"\n{'corpus MB':>10} {'num_proc':>8} {'main peak MB':>13} {'worker peak MB':>15} {'elapsed_s':>10}")
        for row in rss:
            print(f"{row['corpus_text_mb']:>10} {row['num_proc']:>8} {row['peak_rss_main_mb']:>13} "
                  f"{row['peak_rss_worker_max_mb']:>15} {row['elapsed_s']:>10}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=float, default=40, help="text for the throughput runs (MB)")
    parser.add_argument("--model-types", nargs="+", default=["bpe", "unigram"], choices=["bpe", "unigram"])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--train-sentences", type=int, default=200_000, help="tokenizer training sample (lines)")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-mb", type=int, nargs="*", default=[100, 500], help="corpus sizes for peak RSS")
    parser.add_argument("--quick", action="store_true", help="small smoke version (~1-2 min on 2 cores)")
    args = parser.parse_args()
    if args.quick:
        args.corpus_mb, args.model_types, args.train_sentences, args.repeats = 8, ["bpe"], 50_000, 2
        args.rss_mb = [16, 48]
    return args


def main() -> None:
    args = parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    docs = stdlib_documents()
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        corpus.mkdir()
        text_bytes = write_corpus(corpus, docs, int(args.corpus_mb * 1e6))
        results = [bench_model_type(m, corpus, work, args) for m in args.model_types]
        rss = [measure_rss(mb, work / f"tok-{args.model_types[0]}", work, docs, max(args.num_proc))
               for mb in args.rss_mb]
    report = {"benchmark": "prepare", "host": platform.node(), "cpu_count": os.cpu_count(),
              "load_avg_at_end": os.getloadavg(), "corpus_text_mb": round(text_bytes / 1e6, 1),
              "vocab_size": args.vocab_size, "results": results, "peak_rss": rss,
              "target": "prepare_np1 >= 0.85 x raw (one process)"}
    print_report(results, rss)
    out_path = OUT_DIR / f"bench_prepare_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
