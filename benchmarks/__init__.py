"""fastlddmm benchmarks: the asv suite (bench_*.py) and side-by-side comparison scripts."""
