//! Test support: a real control plane per test binary.
