//! Tests against a scripted API server.
