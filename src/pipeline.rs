//! A forwarded request's stages, in order: authenticate ([`access`]), read what must be
//! read ([`read`]), answer from the response cache ([`cached`]), plan the candidates ([`plan`], with [`affinity`] for objects an
//! upstream made), admit under the limits and send ([`try_loop`] over [`send`]; again
//! for a fallback model, [`fallback`]), relay
//! and record ([`relay`]). [`forward`] lists them and runs them over one per-request
//! context ([`exchange`]); [`models`] answers `GET /v1/models` from the config;
//! [`realtime`] runs the same stages for a WebSocket handshake, then relays the session.

pub mod access;
pub mod affinity;
pub mod cached;
pub mod exchange;
pub mod fallback;
pub mod forward;
pub mod models;
pub mod plan;
pub mod read;
pub mod realtime;
pub mod relay;
pub mod send;
pub mod try_loop;
