"""loadgen: workload generation and benchmarks (issue 7 builds it out)."""
