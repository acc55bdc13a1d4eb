//! Herald load generator.
