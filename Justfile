# Developer recipes. `just --list` shows them all.

# Run the whole test suite (the README's test command; CI runs the same through .ci/run).
test:
    cargo test --workspace

# Formatting and lints, as CI expects them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Supervision benchmarks: kill -9 and SIGSTOP detection, saturated false positives, local
# actor messaging. CANOPY_BENCH_SATURATE_SECS=0 skips the 5-minute saturated run.
bench:
    cargo bench -p canopy --bench supervision

# Chaos: the supervision suite with its fault-injection cases, repeated to catch flakes.
chaos times="5":
    for i in $(seq {{times}}); do cargo test -p canopy --test runner_supervision || exit 1; done
