//! Canopy's end-to-end tests: real `canopy` processes (nodes, runners, local clusters) on
//! loopback or in network namespaces the tests make themselves, asserting what a client sees.
//!
//! One test binary, one module a file, the helpers once (`common`: processes, HTTP, SSE,
//! `/state`, waiting; `common::netns`: the namespace fabric). Tests that need root (network
//! namespaces) are marked ignored, with the reason, in a build that is not root
//! (`cfg(canopy_root)`, set by `bin/build.rs`); CI runs the suite as root, so they gate every
//! submission. They live in the `canopy` package so that they always test the binary this
//! build just made (`CARGO_BIN_EXE_canopy`).
//!
//! Run one file's tests with a filter: `cargo test -p canopy --test e2e cluster::`.

mod common;

mod api_compat;
mod api_security;
mod cluster;
mod dashboard;
mod events;
mod hostile;
mod hostile_discovery;
mod netns_fabric;
mod node_chaos;
mod node_model;
mod openapi;
mod runner_protocol;
mod runner_supervision;
