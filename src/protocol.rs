//! The seam between the gateway and the APIs it speaks: what a client's request body says
//! (model, end user, whether it streams), where a path names a model, which answers carry
//! token usage, how an error is written, and what an upstream of some kind needs changed
//! on the way (its path, its body, its answer's shape).
//!
//! Each protocol is a variant of a small `Copy` enum ([`ClientProtocol`], [`UpstreamKind`])
//! whose methods `match` to the protocol's module ([`openai`], [`anthropic`], [`azure`] for
//! Azure OpenAI upstreams, which speak OpenAI's bodies behind other paths and another key
//! header). An enum rather than a trait object: the hot path pays a `match` the compiler
//! can see through (no `dyn`, no `Box`, no vtable), and adding an API is one module and one
//! variant, with the compiler naming every method that must learn it. When a client's API
//! is not its upstream's, [`translate`] carries the request, the answer and the stream
//! across. This module reads no socket and holds no state.

pub mod anthropic;
pub mod azure;
pub mod openai;
pub mod translate;

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderName, Method, Response, header};

use crate::config::{ApiKind, Upstream};
use crate::http::body::Body;
use crate::http::error::ApiError;
use crate::pure::shape::{ModelRename, Shaper};
use translate::Wire;

/// The API a client speaks to sluice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientProtocol {
    OpenAi,
    /// Anthropic's Messages API (`/v1/messages`).
    Anthropic,
}

/// The API an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    OpenAi,
    Anthropic,
    Gemini,
    /// Azure OpenAI: OpenAI's bodies behind deployment paths ([`azure`]).
    Azure,
}

/// A request whose client and upstream speak different APIs: what each side speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub client: Wire,
    pub upstream: Wire,
}

/// What the gateway needs of a request body, borrowed from it where it can be.
#[derive(Debug, Default)]
pub struct BodyFacts<'a> {
    pub model: Option<Cow<'a, str>>,
    pub user: Option<Cow<'a, str>>,
    /// The client asked for a streamed answer.
    pub stream: bool,
    /// The client asked for the usage chunk of its stream itself.
    pub usage_asked: bool,
    /// The body holds stream options (even `null`), which a usage request must replace.
    pub has_stream_options: bool,
}

impl ClientProtocol {
    /// The protocol of a request under `/v1/`, by its path: `/v1/messages…` is
    /// Anthropic's, the rest OpenAI's.
    pub fn of_path(path: &str) -> Self {
        if anthropic::is_path(path) {
            Self::Anthropic
        } else {
            Self::OpenAi
        }
    }

    /// The wire format of the client's chat requests.
    pub fn wire(self) -> Wire {
        match self {
            Self::OpenAi => Wire::OpenAiChat,
            Self::Anthropic => Wire::AnthropicMessages,
        }
    }

    /// Reads the facts routing needs from a request body; an error when it is not the
    /// protocol's document.
    pub fn peek(self, body: &[u8]) -> Result<BodyFacts<'_>, serde_json::Error> {
        match self {
            Self::OpenAi => openai::peek(body),
            Self::Anthropic => anthropic::peek(body),
        }
    }

    /// The model a path names (`/v1/models/{id}`), if it names one.
    pub fn model_in_path<'a>(self, method: &Method, path: &'a str) -> Option<&'a str> {
        match self {
            Self::OpenAi => openai::model_in_path(method, path),
            Self::Anthropic => None,
        }
    }

    /// Endpoints whose requests use no model (objects, operations on something made).
    pub fn model_less(self, path: &str) -> bool {
        match self {
            Self::OpenAi => openai::model_less(path),
            Self::Anthropic => anthropic::model_less(path),
        }
    }

    /// Endpoints whose answers carry token usage.
    pub fn counts_tokens(self, path: &str) -> bool {
        match self {
            Self::OpenAi => openai::counts_tokens(path),
            Self::Anthropic => path == anthropic::MESSAGES,
        }
    }

    /// The body rewritten to ask for a stream's usage, when the client did not and the
    /// endpoint can send it; `None` leaves the body as it is.
    pub fn with_usage_requested(
        self,
        path: &str,
        body: &Bytes,
        facts: &BodyFacts<'_>,
    ) -> Option<Bytes> {
        match self {
            Self::OpenAi => openai::with_usage_requested(path, body, facts),
            // Anthropic's streams always carry their usage.
            Self::Anthropic => None,
        }
    }

    /// An error sluice answers by itself, in the protocol's shape.
    pub fn error_response(self, error: ApiError) -> Response<Body> {
        match self {
            Self::OpenAi => openai::error_response(error),
            Self::Anthropic => anthropic::error_response(error),
        }
    }

    /// An error ending a stream that has begun, as the protocol's last event.
    pub fn error_event(self, error: &ApiError) -> Bytes {
        match self {
            Self::OpenAi => openai::error_event(error),
            Self::Anthropic => anthropic::error_event(error),
        }
    }
}

impl UpstreamKind {
    /// The kind of a configured upstream (`kind:` in its config).
    pub fn of(upstream: &Upstream) -> Self {
        match upstream.kind {
            ApiKind::OpenAi => Self::OpenAi,
            ApiKind::Anthropic => Self::Anthropic,
            ApiKind::Gemini => Self::Gemini,
            ApiKind::Azure => Self::Azure,
        }
    }

    /// The path and query to send the upstream for a gateway path, the client's query
    /// and the client's model (which names an Azure deployment). A translated request
    /// (`translated`: the upstream's model name and whether it streams) goes to the
    /// upstream's own chat endpoint, without the client's query.
    pub fn target<'a>(
        self,
        method: &Method,
        path: &'a str,
        query: Option<&'a str>,
        model: Option<&str>,
        upstream: &Upstream,
        translated: Option<(&str, bool)>,
    ) -> Result<(Cow<'a, str>, Option<Cow<'a, str>>), ApiError> {
        if let Some((upstream_model, stream)) = translated {
            return match self {
                Self::OpenAi => Ok((Cow::Borrowed("/v1/chat/completions"), None)),
                Self::Azure => azure::target("/v1/chat/completions", None, model, upstream),
                Self::Anthropic => Ok((Cow::Borrowed(anthropic::MESSAGES), None)),
                Self::Gemini => Ok((
                    Cow::Owned(translate::gemini::path(upstream_model, stream)),
                    None,
                )),
            };
        }
        match self {
            Self::OpenAi | Self::Anthropic | Self::Gemini => Ok((
                openai::upstream_path(method, path, upstream),
                openai::upstream_query(path, query, model, upstream),
            )),
            Self::Azure => azure::target(path, query, model, upstream),
        }
    }

    /// The header that carries one of the upstream's own keys, and whether its value is
    /// `Bearer KEY` (else the key alone). Tokens always go as `Authorization: Bearer`.
    pub fn key_header(self) -> (HeaderName, bool) {
        match self {
            Self::OpenAi => (header::AUTHORIZATION, true),
            Self::Anthropic => (HeaderName::from_static("x-api-key"), false),
            Self::Gemini => (HeaderName::from_static("x-goog-api-key"), false),
            Self::Azure => (HeaderName::from_static("api-key"), false),
        }
    }

    /// Whether the upstream serves OpenAI's Realtime API (`/v1/realtime` over WebSocket).
    pub fn speaks_realtime(self) -> bool {
        match self {
            Self::OpenAi | Self::Azure => true,
            Self::Anthropic | Self::Gemini => false,
        }
    }

    /// Whether the client's model name is put back into the answer: when the upstream
    /// was asked for another name than the client's for the model that serves (`served`:
    /// the client's, or a fallback's), and always for Azure, which answers with the
    /// deployment's model (`gpt-4o-2024-08-06`).
    pub fn puts_model_back(self, upstream: &Upstream, served: &str, client_model: &str) -> bool {
        match self {
            Self::OpenAi | Self::Anthropic | Self::Gemini => {
                upstream.upstream_model(served) != client_model
            }
            Self::Azure => true,
        }
    }

    /// The wire format of the upstream's chat requests.
    pub fn wire(self) -> Wire {
        match self {
            Self::OpenAi | Self::Azure => Wire::OpenAiChat,
            Self::Anthropic => Wire::AnthropicMessages,
            Self::Gemini => Wire::Gemini,
        }
    }

    /// Whether a request on `path` from a `client` is translated for this upstream
    /// (`Some`), passes as it is (`None`), or cannot be served by it at all (400).
    pub fn route(self, client: ClientProtocol, path: &str) -> Result<Option<Route>, ApiError> {
        let route = Route {
            client: client.wire(),
            upstream: self.wire(),
        };
        if route.client == route.upstream {
            return Ok(None);
        }
        let chat = match client {
            ClientProtocol::OpenAi => "/v1/chat/completions",
            ClientProtocol::Anthropic => anthropic::MESSAGES,
        };
        if path == chat {
            Ok(Some(route))
        } else {
            Err(ApiError::bad_request(
                "unsupported_endpoint",
                format!(
                    "`{path}` cannot be served by this model's upstream, which speaks {}",
                    self.name()
                ),
            ))
        }
    }

    /// The API's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::OpenAi => "OpenAI's API",
            Self::Anthropic => "Anthropic's Messages API",
            Self::Gemini => "Gemini's API",
            Self::Azure => "Azure OpenAI's API",
        }
    }

    /// The body to send the upstream, or `None` when the client's bytes go as they are.
    pub fn request_body(
        self,
        body: &Bytes,
        client_model: Option<&str>,
        upstream: &Upstream,
    ) -> Result<Option<Bytes>, serde_json::Error> {
        crate::pure::rewrite::request_body(body, client_model, upstream)
    }

    /// How the upstream's answer must change on its way to the client: the client's model
    /// name put back (`rename`) in a JSON or SSE answer, a usage chunk the client did not
    /// ask for taken out of a stream. `None` relays it unchanged.
    pub fn shaper(
        self,
        sse: bool,
        json: bool,
        rename: Option<&str>,
        strip_usage: bool,
    ) -> Option<Shaper> {
        match self {
            Self::OpenAi | Self::Anthropic | Self::Gemini | Self::Azure => {
                let rename = rename
                    .filter(|_| sse || json)
                    .map(|m| ModelRename { to: m.to_string() });
                let strip_usage = strip_usage && sse;
                (rename.is_some() || strip_usage).then(|| Shaper::new(sse, rename, strip_usage))
            }
        }
    }
}

impl ApiError {
    /// The error as an OpenAI client's answer, for the admin routes and the edge's own
    /// refusals outside `/v1/`; wherever the path is known, [`ClientProtocol::of_path`]
    /// and [`ClientProtocol::error_response`] write it in the client's protocol.
    pub fn into_response(self) -> Response<Body> {
        ClientProtocol::OpenAi.error_response(self)
    }

    /// The error's JSON body alone, for places that must embed it.
    pub fn to_json(&self) -> String {
        openai::error_json(self)
    }
}
