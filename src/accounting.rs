//! What a request costs and what it leaves behind, off the hot path: the records a request
//! fills as plain data ([`records`]), the request log's accountant and writer
//! ([`recorder`]), and limits and counters shared by several instances through Redis
//! ([`shared`]).

pub mod inbox;
pub mod recorder;
pub mod records;
pub mod shared;
