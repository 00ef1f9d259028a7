//! A forwarded request's stages, in order: authenticate ([`access`]), read what must be
//! read, plan the candidates (with [`affinity`] for objects an upstream made), admit
//! under the limits, send (the try loop), relay (shaping) and record. [`forward`] runs
//! them; [`models`] answers `GET /v1/models` from the config.

pub mod access;
pub mod affinity;
pub mod forward;
pub mod models;
