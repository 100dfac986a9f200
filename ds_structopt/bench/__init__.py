"""Benchmarks against AdamW and peers: ``ds-structopt bench {convergence,step,dist}`` (see docs/benchmarks.md)."""
