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

# API overhead: TTFT, decode tokens/s and latency through the node's HTTP API vs the engine
# called directly (same build, prompt, 2 threads each); CANOPY_BENCH_REPS (default 5).
bench-api:
    cargo bench -p canopy --bench api_overhead

# Chaos: the supervision suite with its fault-injection cases, repeated to catch flakes.
chaos times="5":
    for i in $(seq {{times}}); do cargo test -p canopy --test e2e runner_supervision:: || exit 1; done

# Builds llama.cpp's llama-bench first (scripts/build-llama-cpp.sh, cached under
# /tmp/canopy-llama.cpp) unless LLAMA_BENCH names one; if that build fails, Canopy is
# benchmarked alone. LLAMA_CPP_NATIVE=ON builds llama.cpp with -march=native. Both engines use
# CANOPY_BENCH_THREADS (default 2) threads; more settings in engine/benches/engine.rs.
# Engine benchmark: load, prompt/generation tokens/s, peak RSS; Canopy vs llama.cpp, same file.
bench-engine:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -z "${LLAMA_BENCH:-}" ]; then
        LLAMA_BENCH="$(scripts/build-llama-cpp.sh)" \
            || { echo "building llama.cpp failed; benchmarking Canopy alone" >&2; LLAMA_BENCH=; }
    fi
    LLAMA_BENCH="$LLAMA_BENCH" cargo bench -p canopy-engine --bench engine

# What grammar-constrained decoding costs: building the grammar compiler, compiling a schema or
# a forced tool call, and the mask per token (engine/benches/grammar.rs).
bench-grammar:
    cargo bench -p canopy-engine --bench grammar

# Serving benchmark (continuous batching): 1, 4, 8, 16 concurrent streaming chat clients
# against `canopy up --parallel 16` and llama.cpp's llama-server -np 16 on the same file and
# threads (CANOPY_BENCH_THREADS, default 2): aggregate tokens/s, TTFT and latency p50/p95, peak
# RSS, repeated-prompt TTFT. Builds llama-server first (scripts/build-llama-cpp.sh
# llama-server; LLAMA_CPP_NATIVE=ON for -march=native) unless LLAMA_SERVER names one; if that
# build fails, Canopy is benchmarked alone. More settings in bin/benches/serve.rs.
bench-serve:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -z "${LLAMA_SERVER:-}" ]; then
        LLAMA_SERVER="$(scripts/build-llama-cpp.sh llama-server)" \
            || { echo "building llama-server failed; benchmarking Canopy alone" >&2; LLAMA_SERVER=; }
    fi
    LLAMA_SERVER="$LLAMA_SERVER" cargo bench -p canopy --bench serve

# Soak: a 3-node cluster (network namespaces, root) on a saturated machine must declare no peer dead; CANOPY_SOAK_SECS (default 120).
soak-cluster:
    cargo test -p canopy --test e2e -- --ignored --nocapture cluster::no_false_peer_deaths

# Cluster numbers with real processes in network namespaces (needs root): formation, failure detection (kill -9, SIGSTOP), master failover, cross-node vs local request.
bench-cluster:
    cargo bench -p canopy --bench cluster

# Remote actor messaging between two nodes over loopback TCP: call round trip and cast throughput.
bench-messaging:
    cargo bench -p canopy-runtime --bench cluster_messaging

# The MLX engine's tests on Linux (MLX's CPU backend through a patched mlx-sys; see scripts/mlx-linux/test.sh).
test-mlx-linux *args:
    scripts/mlx-linux/test.sh {{args}}
