//! Config loading (`src/config/load.rs`): YAML, then `SLUICE_…` environment layering, then
//! validation.
//!
//! Input: YAML text, a NUL byte, then `NAME=value` lines for the environment.
//! Properties:
//! - any document and environment give a config or a list of problems, never a panic;
//! - problems never quote a secret (gateway keys, upstream keys, the admin key, keys read
//!   from the environment through `key_env` / `keys_env`), and neither does a resolved
//!   config's `Debug`;
//! - every problem says what is wrong.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice::config::EnvMap;
use sluice::config::load::{apply_env_overrides, parse_document, resolve};

/// Secrets short enough to occur by chance in a message ("key", "a list") are not judged.
const MIN_SECRET: usize = 6;

/// Whether a secret can be told apart from the text of a problem: long enough, with a
/// letter and a digit (no word of a message has both), and none of the characters paths
/// and messages join their parts with (`upstreams[0].keys`, `` `a`, `b` ``).
fn judged(secret: &str) -> bool {
    secret.len() >= MIN_SECRET
        && secret.chars().any(|c| c.is_ascii_digit())
        && secret.chars().any(|c| c.is_alphabetic())
        && !secret
            .chars()
            .any(|c| ".[]`'\", :()=".contains(c) || c.is_whitespace())
}

fn strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// Secret values in a document: where the config keeps keys.
fn secrets<'a>(document: &'a Value, env: &'a EnvMap) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut env_names = Vec::new();
    if let Some(key) = document.pointer("/admin/key") {
        strings(key, &mut out);
    }
    for key in document
        .pointer("/access/keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(value) = key.get("key") {
            strings(value, &mut out);
        }
        if let Some(Value::String(name)) = key.get("key_env") {
            env_names.push(name.as_str());
        }
    }
    for upstream in document
        .pointer("/upstreams")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(keys) = upstream.get("keys") {
            strings(keys, &mut out);
        }
        if let Some(Value::String(name)) = upstream.get("keys_env") {
            env_names.push(name.as_str());
        }
    }
    for name in env_names {
        if let Some(value) = env.0.get(name) {
            out.push(value);
        }
    }
    out
}

/// Every map key and every value that is not a secret: a secret that is also (part of) one
/// of these may be quoted legitimately. Strings under `key`/`keys` are the secrets; maps
/// under them (access.keys is a list of maps) are searched as usual.
fn public_text(value: &Value, in_secret_slot: bool, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                out.push(key.clone());
                public_text(inner, key == "key" || key == "keys", out);
            }
        }
        Value::Array(items) => items
            .iter()
            .for_each(|v| public_text(v, in_secret_slot, out)),
        Value::String(_) if in_secret_slot => {}
        Value::String(s) => out.push(s.clone()),
        other => out.push(other.to_string()),
    }
}

fuzz_target!(|data: &[u8]| {
    let (yaml, env_text) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(yaml) = std::str::from_utf8(yaml) else {
        return;
    };
    let env_text = String::from_utf8_lossy(env_text);
    let env = EnvMap(
        env_text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    let Ok(mut document) = parse_document(yaml) else {
        return;
    };
    let layered = apply_env_overrides(&mut document, &env);
    let result = resolve(&document, &env);

    let secrets: Vec<&str> = secrets(&document, &env)
        .into_iter()
        .filter(|s| judged(s))
        .collect();
    let mut public = Vec::new();
    public_text(&document, false, &mut public);
    public.extend(env.0.keys().cloned());
    let judged: Vec<&str> = secrets
        .into_iter()
        .filter(|s| !public.iter().any(|p| p.contains(s)))
        .collect();

    let problems = layered
        .err()
        .into_iter()
        .flatten()
        .chain(result.as_ref().err().into_iter().flatten().cloned());
    for problem in problems {
        assert!(
            !problem.message.is_empty(),
            "a problem without a message at {}",
            problem.path
        );
        for secret in &judged {
            assert!(
                !problem.message.contains(secret) && !problem.path.contains(secret),
                "a problem quotes a secret: {}: {}",
                problem.path,
                problem.message
            );
        }
    }
    if let Ok(config) = &result {
        let debug = format!("{config:?}");
        for secret in &judged {
            assert!(!debug.contains(secret), "the config's Debug shows a secret");
        }
    }
});
