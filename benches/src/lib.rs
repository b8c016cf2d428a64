//! Benchmarks of deploykit; see `benches/`.
