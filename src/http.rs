//! The HTTP edge: the listener and one request's dispatch, and what every answer shares.
//! Only this folder and [`crate::pipeline`] know status codes and headers; everything
//! sluice answers itself goes out through [`error::ApiError`], OpenAI-shaped.

pub mod body;
pub mod cors;
pub mod error;
pub mod headers;
pub mod multipart;
pub mod server;
pub mod tls;
