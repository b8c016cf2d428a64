//! Runnable examples of embedding deploykit; see the `examples/` directory.
