//! Library implementations of `shoal rafs inspect|check|unpack`; the CLI only parses arguments
//! and prints what these return.
