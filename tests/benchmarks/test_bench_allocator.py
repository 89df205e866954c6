"""benchmarks/bench_allocator.py's section: each glibc setting's median speed and highest peak against the
defaults' row, and whether its losses are the defaults' own (the allocator moves no number)."""

from helpers import ROOT, load_script

BENCH = load_script(ROOT / "benchmarks" / "bench_allocator.py", "bench_allocator")


def run(setting, tokens, seconds, peak_mb, losses=(0.69, 0.70)):
    return {"setting": setting, "tokens": tokens, "seconds": seconds, "peak_rss_mb": peak_mb, "losses": list(losses)}


def test_rows_are_ratios_to_the_defaults():
    """Defaults: rounds at 100 and 150 tokens/s (median of 2 = the upper one, 150), peaks 4096 and 3072 MB (highest:
    4096). 4 MiB: 120 tokens/s = 0.80x, 3072 MB = 0.75x. Arena: other losses, so 'NO'."""
    defaults, mmap4, arena = list(BENCH.SETTINGS)[0], list(BENCH.SETTINGS)[2], list(BENCH.SETTINGS)[3]
    runs = [
        run(defaults, 1000, 10.0, 4096),
        run(defaults, 1500, 10.0, 3072),
        run(mmap4, 1200, 10.0, 3072),
        run(arena, 600, 10.0, 2048, losses=(0.69, 0.71)),
    ]
    settings = dict(rounds=2, pairs=48, max_length=256, threads=2, cpu="cpu", versions="v")
    rows = {
        line.split(" | ")[0][2:]: line for line in BENCH.markdown(runs, settings).splitlines() if line.startswith("| ")
    }
    assert rows[defaults] == f"| {defaults} | 150 | 1.00x | 4.00 | 1.00x | yes |"
    assert rows[mmap4] == f"| {mmap4} | 120 | 0.80x | 3.00 | 0.75x | yes |"
    assert rows[arena] == f"| {arena} | 60 | 0.40x | 2.00 | 0.50x | NO |"
