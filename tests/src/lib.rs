//! End-to-end suite lives in tests/e2e.
