//! Azure OpenAI as an upstream. It speaks OpenAI's bodies, answers and errors, so only the
//! way in differs: the client's model picks a *deployment*, named in the path
//! (`/openai/deployments/{deployment}/chat/completions`), every request carries the
//! resource's `api-version` in its query, and the key goes in an `api-key` header (an
//! Entra ID token goes as `Authorization: Bearer`, from the token provider). With
//! `api_version: v1` the newer `/openai/v1/...` paths are used instead: no version in the
//! query, the deployment named by the body's `model` (which `model_map` already rewrites).
//!
//! The answer names the deployment's underlying model (`gpt-4o-2024-08-06`), so the
//! client's own name is always put back (see [`super::UpstreamKind::puts_model_back`]).

use std::borrow::Cow;

use crate::config::Upstream;
use crate::http::error::ApiError;

/// `api_version` that selects the `/openai/v1/` paths.
pub const V1: &str = "v1";

/// Gateway endpoints that Azure serves under a deployment.
const DEPLOYMENT_ENDPOINTS: [&str; 9] = [
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/images/generations",
    "/images/edits",
    "/audio/transcriptions",
    "/audio/translations",
    "/audio/speech",
    "/realtime",
];

/// Whether `name` can be a deployment: Azure allows letters, digits, `-`, `_` and `.`, up
/// to 64 of them. Anything else could change the path it is put in, so it is refused.
pub fn is_deployment_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name != "."
        && name != ".."
}

/// The path and query to send an Azure upstream for the gateway path `path` (`/v1/...`),
/// the client's query and the client's model.
pub fn target<'a>(
    path: &'a str,
    query: Option<&'a str>,
    model: Option<&str>,
    upstream: &Upstream,
) -> Result<(Cow<'a, str>, Option<Cow<'a, str>>), ApiError> {
    let version = upstream.api_version.as_deref().unwrap_or(V1);
    let rest = path.strip_prefix("/v1").unwrap_or(path);
    if version == V1 {
        // The v1 API names the deployment in the body (`model`) and needs no version.
        let query = match (rest, model) {
            ("/realtime", Some(model)) => {
                // The client's `model` gives way to the deployment it names.
                let others = without_param(query, "model");
                Some(Cow::Owned(with_param(
                    others.as_deref(),
                    "model",
                    deployment(model, upstream)?,
                )))
            }
            _ => query.map(Cow::Borrowed),
        };
        return Ok((Cow::Owned(format!("/openai/v1{rest}")), query));
    }
    let query = without_param(query, "api-version");
    let query = with_param(query.as_deref(), "api-version", version);
    if !DEPLOYMENT_ENDPOINTS.contains(&rest) {
        return Ok((
            Cow::Owned(format!("/openai{rest}")),
            Some(Cow::Owned(query)),
        ));
    }
    let model = model.ok_or_else(|| {
        ApiError::bad_request(
            "missing_model",
            "`model` is required: it names the Azure deployment to use",
        )
    })?;
    let deployment = deployment(model, upstream)?;
    if rest == "/realtime" {
        // Realtime names its deployment in the query, not the path.
        let query = with_param(Some(&query), "deployment", deployment);
        return Ok((Cow::Borrowed("/openai/realtime"), Some(Cow::Owned(query))));
    }
    Ok((
        Cow::Owned(format!("/openai/deployments/{deployment}{rest}")),
        Some(Cow::Owned(query)),
    ))
}

/// The deployment serving the client's `model`: the configured one (`deployments` or
/// `model_map`), else a deployment named like the model.
fn deployment<'a>(model: &'a str, upstream: &'a Upstream) -> Result<&'a str, ApiError> {
    let name = upstream.upstream_model(model);
    if is_deployment_name(name) {
        Ok(name)
    } else {
        Err(ApiError::bad_request(
            "invalid_model",
            "`model` names no deployment of this Azure upstream: a deployment name is letters, digits, '-', '_' or '.'",
        ))
    }
}

/// `query` without the parameter `name` (the operator's `api_version` wins over a
/// client's).
fn without_param<'a>(query: Option<&'a str>, name: &str) -> Option<Cow<'a, str>> {
    let query = query.filter(|q| !q.is_empty())?;
    let is_it = |pair: &str| pair.split('=').next() == Some(name);
    if !query.split('&').any(is_it) {
        return Some(Cow::Borrowed(query));
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !is_it(p)).collect();
    (!kept.is_empty()).then(|| Cow::Owned(kept.join("&")))
}

/// `query` with `name=value` appended; `value` is plain (letters, digits, `-_.`), so it
/// needs no encoding.
fn with_param(query: Option<&str>, name: &str, value: &str) -> String {
    match query.filter(|q| !q.is_empty()) {
        Some(query) => format!("{query}&{name}={value}"),
        None => format!("{name}={value}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ApiKind, ModelSet, Timeouts};

    fn azure(version: &str) -> Upstream {
        Upstream {
            name: "az".into(),
            kind: ApiKind::Azure,
            api_version: Some(version.into()),
            base_url: "https://res.openai.azure.com".into(),
            keys: Vec::new(),
            models: ModelSet::any(),
            headers: Vec::new(),
            proxy: None,
            timeouts: Timeouts::default(),
            model_map: [("gpt-4o".to_string(), "prod-4o".to_string())].into(),
            field_aliases: Vec::new(),
            paths: Default::default(),
            weight: 1,
            token: None,
            limits: Default::default(),
            http2: Default::default(),
            tls_ca: None,
            http2_streams: crate::config::Upstream::HTTP2_STREAMS,
            http2_idle: crate::config::Upstream::HTTP2_IDLE,
            idle_connections: 1024,
        }
    }

    #[track_caller]
    fn check(version: &str, path: &str, query: Option<&str>, model: Option<&str>, want: &str) {
        let upstream = azure(version);
        let (path, query) = target(path, query, model, &upstream).unwrap();
        let got = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.into_owned(),
        };
        assert_eq!(got, want);
    }

    #[test]
    fn deployment_endpoints_name_the_deployment_and_the_version() {
        let v = "2024-10-21";
        check(
            v,
            "/v1/chat/completions",
            None,
            Some("gpt-4o"),
            "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
        );
        check(
            v,
            "/v1/embeddings",
            Some("x=1&api-version=evil"),
            Some("text-embedding-3-small"),
            "/openai/deployments/text-embedding-3-small/embeddings?x=1&api-version=2024-10-21",
        );
        check(
            v,
            "/v1/audio/transcriptions",
            None,
            Some("whisper"),
            "/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21",
        );
        check(
            v,
            "/v1/files",
            Some("purpose=batch"),
            None,
            "/openai/files?purpose=batch&api-version=2024-10-21",
        );
        check(
            v,
            "/v1/realtime",
            Some("model=gpt-4o"),
            Some("gpt-4o"),
            "/openai/realtime?model=gpt-4o&api-version=2024-10-21&deployment=prod-4o",
        );
    }

    #[test]
    fn v1_paths_need_no_version() {
        check(
            V1,
            "/v1/chat/completions",
            None,
            Some("gpt-4o"),
            "/openai/v1/chat/completions",
        );
        check(
            V1,
            "/v1/realtime",
            Some("model=gpt-4o&x=1"),
            Some("gpt-4o"),
            "/openai/v1/realtime?x=1&model=prod-4o",
        );
    }

    #[test]
    fn a_model_that_could_change_the_path_is_refused() {
        let upstream = azure("2024-10-21");
        for model in ["../admin", "a/b", "a?b", "a b", "", ".."] {
            let error = target("/v1/chat/completions", None, Some(model), &upstream).unwrap_err();
            assert_eq!(error.status.as_u16(), 400, "{model}");
        }
        let error = target("/v1/chat/completions", None, None, &upstream).unwrap_err();
        assert!(error.message.contains("`model`"), "{}", error.message);
    }
}
