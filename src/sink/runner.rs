//! The delivery loop (placeholder until the runner lands).
