//! The one context a forwarded request carries through its stages (Pingora's per-request
//! CTX): who asks, what was asked, the log record, the tries so far and where the key was
//! counted. Each stage reads what it needs and writes what it learned here, so what
//! [`forward`](super::forward) must undo on a refusal (a refund, the record) is in one
//! place.

use http::Response;
use http::request::Parts;

use crate::accounting::records::KeyTicket;
use crate::accounting::records::Pending;
use crate::accounting::records::{Attempt, CacheNote};
use crate::gateway::Gateway;
use crate::http::body::Body;
use crate::http::error::ApiError;
use crate::pipeline::access::Caller;
use crate::protocol::ClientProtocol;

/// One forwarded request on its way through the stages.
pub struct Exchange<'r> {
    pub gateway: &'r Gateway,
    pub caller: &'r Caller,
    pub protocol: ClientProtocol,
    /// The request's head; its headers are taken when the first try is built.
    pub parts: Parts,
    /// The path without the route prefix.
    pub path: &'r str,
    /// The log record, if the log is on; submitted when the exchange ends.
    pub record: Option<Box<Pending>>,
    /// Tries sent upstream.
    pub tries: usize,
    /// Where the caller's key was counted, once it was.
    pub ticket: Option<KeyTicket>,
    /// Every try so far, for the log.
    pub attempts: Vec<Attempt>,
    /// What the response cache made of it, when the cache is on (`x-sluice-cache`).
    pub cache: Option<CacheNote>,
    /// The request opens a WebSocket (a realtime session): the upstream is asked to
    /// switch protocols too.
    pub websocket: bool,
}

impl<'r> Exchange<'r> {
    /// A request just authenticated, before any stage ran.
    pub fn new(
        gateway: &'r Gateway,
        caller: &'r Caller,
        parts: Parts,
        path: &'r str,
        record: Option<Box<Pending>>,
    ) -> Self {
        Self {
            gateway,
            caller,
            protocol: ClientProtocol::of_path(path),
            parts,
            path,
            record,
            tries: 0,
            ticket: None,
            attempts: Vec::new(),
            cache: None,
            websocket: false,
        }
    }

    /// Answers a refusal: a key counted for a request that never went upstream is refunded
    /// (the request does not count), the record is submitted with the error, and the
    /// error is written in the client's protocol.
    pub fn refuse(mut self, error: ApiError) -> Response<Body> {
        if let (0, Caller::Gateway(key), Some(ticket)) = (self.tries, self.caller, self.ticket) {
            self.gateway.refund(key, ticket);
            if let Some(record) = self.record.as_mut() {
                record.ticket = None;
            }
        }
        self.gateway.record_error(self.record, &error);
        self.protocol.error_response(error)
    }
}
