//! The mock's Azure OpenAI face (`--protocol azure`): Azure's paths are checked and turned
//! into OpenAI's, which the rest of the mock answers. A deployment the mock does not have
//! (its `models`) is a 404 as Azure's is, and a request without `api-version` is refused as
//! Azure refuses it; an answer names the deployment's underlying model, as Azure's do.

use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode, Uri};
use serde_json::{Value, json};

use crate::http::body::{Body, json_response};

/// What an Azure request becomes for the OpenAI mock.
pub(super) struct Translated {
    /// `/v1/...` and the query without `api-version`.
    pub uri: Uri,
    /// The body with `model` set to the deployment's model, when it is JSON.
    pub body: Bytes,
}

/// The model an answer from `deployment` names: Azure reports the model a deployment
/// runs, with its version, never the deployment's own name.
pub fn deployment_model(deployment: &str) -> String {
    format!("{deployment}-2024-08-06")
}

/// Checks an Azure request (path, `api-version`, deployment) and translates it.
pub(super) fn translate(
    parts: &Parts,
    body: &Bytes,
    deployments: &[String],
) -> Result<Translated, Box<Response<Body>>> {
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    let (rest, deployment) = if let Some(rest) = path.strip_prefix("/openai/v1/") {
        // The v1 API needs no version; the body's `model` is the deployment.
        let deployment = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|b| b.get("model").and_then(Value::as_str).map(str::to_string));
        (rest.to_string(), deployment)
    } else {
        let Some(rest) = path.strip_prefix("/openai/") else {
            return Err(not_found());
        };
        if !query.split('&').any(|p| {
            p.strip_prefix("api-version=")
                .is_some_and(|v| !v.is_empty())
        }) {
            return Err(not_found());
        }
        match rest.strip_prefix("deployments/") {
            Some(tail) => {
                let (deployment, endpoint) = tail.split_once('/').unwrap_or((tail, ""));
                (endpoint.to_string(), Some(deployment.to_string()))
            }
            None => (rest.to_string(), None),
        }
    };
    if let Some(deployment) = &deployment {
        if !deployments.iter().any(|d| d == deployment) {
            return Err(Box::new(json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": {"code": "DeploymentNotFound", "message":
                    "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again."}}),
            )));
        }
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("api-version="))
        .collect();
    let uri = if kept.is_empty() {
        format!("/v1/{rest}")
    } else {
        format!("/v1/{rest}?{}", kept.join("&"))
    };
    let uri = uri.parse::<Uri>().map_err(|_| not_found())?;
    let body = match (&deployment, serde_json::from_slice::<Value>(body)) {
        (Some(deployment), Ok(Value::Object(mut object))) => {
            object.insert("model".into(), Value::String(deployment_model(deployment)));
            Bytes::from(Value::Object(object).to_string())
        }
        _ => body.clone(),
    };
    Ok(Translated { uri, body })
}

fn not_found() -> Box<Response<Body>> {
    Box::new(json_response(
        StatusCode::NOT_FOUND,
        &json!({"error": {"code": "404", "message": "Resource not found"}}),
    ))
}
