//! Helpers for end-to-end tests that run the real binaries against real clients.
