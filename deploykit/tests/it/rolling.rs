//! Rolling engine scenarios.
