//! Helpers for integration tests that start real processes.
