//! Request rewriting (`src/pure/rewrite.rs`) on arbitrary request bodies.
//!
//! Input: a flags byte choosing the model map and field aliases, then the body.
//! Properties:
//! - a rewritten body is valid JSON, and is refused only when the input is not JSON;
//! - nothing is rewritten when nothing applies;
//! - the mapped model is what the upstream gets; without aliases nothing else changes;
//! - after renaming `from` to `to`, no object anywhere still has a `from` key;
//! - asking for the usage chunk (as `pipeline/forward.rs` does for a body it has peeked at) keeps the
//!   JSON valid, keeps every other field, and really sets `stream_options.include_usage`.

#![no_main]

use std::collections::HashMap;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice::config::{Limits, ModelSet, Timeouts, Upstream};
use sluice::pure::rewrite::{request_body, with_usage_requested};

const NAMES: [&str; 6] = ["model", "model_id", "messages", "content", "stream", "x"];

/// An upstream that maps models and renames fields as the fuzz input says.
fn upstream(model_map: HashMap<String, String>, field_aliases: Vec<(String, String)>) -> Upstream {
    Upstream {
        name: "fuzz".into(),
        kind: Default::default(),
        api_version: None,
        base_url: "http://127.0.0.1:9".into(),
        keys: Vec::new(),
        models: ModelSet::any(),
        headers: Vec::new(),
        proxy: None,
        timeouts: Timeouts::default(),
        model_map,
        field_aliases,
        paths: HashMap::new(),
        weight: 1,
        token: None,
        limits: Limits::default(),
        http2: Default::default(),
        tls_ca: None,
        idle_connections: Upstream::IDLE_CONNECTIONS,
        http2_streams: Upstream::HTTP2_STREAMS,
        http2_idle: Upstream::HTTP2_IDLE,
    }
}

fn has_key(value: &Value, key: &str) -> bool {
    match value {
        Value::Object(map) => map.contains_key(key) || map.values().any(|v| has_key(v, key)),
        Value::Array(items) => items.iter().any(|v| has_key(v, key)),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let body = Bytes::copy_from_slice(body);
    let parsed = serde_json::from_slice::<Value>(&body);
    let client_model = parsed
        .as_ref()
        .ok()
        .and_then(|v| v.get("model"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut model_map = HashMap::new();
    if flags & 1 != 0 {
        if let Some(model) = &client_model {
            model_map.insert(model.clone(), format!("upstream-{model}"));
        }
    }
    let alias = (flags & 2 != 0).then(|| {
        let from = NAMES[usize::from(flags >> 2) % NAMES.len()];
        let to = NAMES[usize::from(flags >> 5) % NAMES.len()];
        (from.to_string(), to.to_string())
    });
    let aliases: Vec<(String, String)> = alias.clone().into_iter().collect();
    let up = upstream(model_map.clone(), aliases.clone());

    match request_body(&body, client_model.as_deref(), &up) {
        Ok(None) => assert!(
            model_map.is_empty() && aliases.is_empty(),
            "a rewrite applies, yet the body went as it was"
        ),
        Err(_) => assert!(parsed.is_err(), "valid JSON refused by the rewrite"),
        Ok(Some(out)) => {
            let out: Value = serde_json::from_slice(&out).expect("the rewritten body is JSON");
            let input = parsed
                .as_ref()
                .expect("a rewrite of invalid JSON succeeded");
            if aliases.is_empty() {
                let mut expected = input.clone();
                if let (Some(model), Some(object)) = (&client_model, expected.as_object_mut()) {
                    object.insert("model".into(), Value::String(format!("upstream-{model}")));
                }
                assert_eq!(out, expected, "the rewrite changed more than the model");
            }
            if let Some((from, to)) = &alias {
                if from != to {
                    assert!(
                        !has_key(&out, from),
                        "`{from}` survived its rename to `{to}`"
                    );
                }
            }
        }
    }

    // The usage chunk, asked for the way `pipeline/forward.rs` does it: only for a body it peeked at.
    if let Ok(peek) = serde_json::from_slice::<sluice::protocol::openai::Peek>(&body) {
        if let Ok(Value::Object(input)) = &parsed {
            let out = with_usage_requested(&body, peek.stream_options.is_some())
                .expect("an object gets the usage chunk asked for");
            let out: Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
                panic!(
                    "asking for usage broke the JSON ({e}): {}",
                    String::from_utf8_lossy(&out)
                )
            });
            assert_eq!(
                out.pointer("/stream_options/include_usage"),
                Some(&Value::Bool(true)),
                "stream_options.include_usage is not set in {out}"
            );
            for (key, value) in input {
                if key != "stream_options" {
                    assert_eq!(out.get(key), Some(value), "`{key}` changed");
                }
            }
        }
    }
});
