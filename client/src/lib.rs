//! The `ballast` client: CLI commands, typed control-plane client, NBD client and benchmark harness.
