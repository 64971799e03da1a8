"""`python -m experiments.benchmarks [--readme README.md] ...`: every benchmark, the same as
`python -m experiments bench --all ...` (`experiments.harness.bench_cli.run_all`)."""
from experiments.harness import bench_cli

if __name__ == "__main__":
    bench_cli.run_all()
