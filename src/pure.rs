//! Decisions and transforms that touch no socket and no disk: which upstream and key,
//! limit windows, body rewrites, SSE shaping and usage extraction. They are tested
//! without a server.

pub mod limits;
pub mod rewrite;
pub mod routing;
pub mod shape;
pub mod usage;
