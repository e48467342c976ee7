//! Harness for end-to-end tests: starts a real origin registry, shoal nodes and clients.
