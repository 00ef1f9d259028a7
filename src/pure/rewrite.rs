//! Request rewriting for one upstream: the client's model name becomes the upstream's
//! (`model_map`), then fields are renamed recursively (`field_aliases`, seed 000's
//! `model` → `model_id`). Bodies are untouched when nothing applies.

use bytes::Bytes;
use serde_json::Value;

use crate::config::Upstream;

/// Renames object keys everywhere in `value`: nested objects and objects inside arrays.
pub fn rename_fields(value: &mut Value, aliases: &[(String, String)]) {
    match value {
        Value::Object(map) => {
            for (from, to) in aliases {
                if let Some(inner) = map.remove(from) {
                    map.insert(to.clone(), inner);
                }
            }
            for inner in map.values_mut() {
                rename_fields(inner, aliases);
            }
        }
        Value::Array(items) => {
            for item in items {
                rename_fields(item, aliases);
            }
        }
        _ => {}
    }
}

/// The body to send `upstream`, or `None` when the original bytes can go as they are.
pub fn request_body(
    body: &Bytes,
    client_model: Option<&str>,
    upstream: &Upstream,
) -> Result<Option<Bytes>, serde_json::Error> {
    let mapped = client_model
        .map(|m| (m, upstream.upstream_model(m)))
        .filter(|(from, to)| from != to);
    if mapped.is_none() && upstream.field_aliases.is_empty() {
        return Ok(None);
    }
    let mut value: Value = serde_json::from_slice(body)?;
    if let (Some((_, to)), Some(object)) = (mapped, value.as_object_mut()) {
        object.insert("model".into(), Value::String(to.to_string()));
    }
    rename_fields(&mut value, &upstream.field_aliases);
    serde_json::to_vec(&value).map(|bytes| Some(Bytes::from(bytes)))
}

/// A streamed request body that also asks for the usage chunk
/// (`stream_options.include_usage`), so sluice can count a stream's tokens.
pub fn with_usage_requested(body: &Bytes, has_stream_options: bool) -> Option<Bytes> {
    if has_stream_options {
        let mut value: Value = serde_json::from_slice(body).ok()?;
        let options = value
            .as_object_mut()?
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if !options.is_object() {
            *options = Value::Object(Default::default());
        }
        options
            .as_object_mut()?
            .insert("include_usage".into(), Value::Bool(true));
        return serde_json::to_vec(&value).ok().map(Bytes::from);
    }
    // Cheaper than a round trip through a JSON tree: insert the field after the `{`.
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[start] != b'{' {
        return None;
    }
    let after = body[start + 1..]
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map(|p| p + start + 1)?;
    let field: &[u8] = if body[after] == b'}' {
        b"\"stream_options\":{\"include_usage\":true}"
    } else {
        b"\"stream_options\":{\"include_usage\":true},"
    };
    let mut out = Vec::with_capacity(body.len() + field.len());
    out.extend_from_slice(&body[..=start]);
    out.extend_from_slice(field);
    out.extend_from_slice(&body[start + 1..]);
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_is_requested_without_disturbing_the_body() {
        let body = Bytes::from_static(b" {\"model\":\"m\",\"stream\":true}");
        let out = with_usage_requested(&body, false).unwrap();
        let value: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            value,
            json!({"stream_options": {"include_usage": true}, "model": "m", "stream": true})
        );
        let with_options = Bytes::from_static(
            b"{\"stream\":true,\"stream_options\":{\"include_usage\":false,\"x\":1}}",
        );
        let value: Value =
            serde_json::from_slice(&with_usage_requested(&with_options, true).unwrap()).unwrap();
        assert_eq!(
            value["stream_options"],
            json!({"include_usage": true, "x": 1})
        );
        assert!(with_usage_requested(&Bytes::from_static(b"[1]"), false).is_none());
    }

    #[test]
    fn renames_recursively_through_objects_and_arrays() {
        let mut value = json!({"model": "m", "messages": [{"model": "inner", "x": {"model": 1}}], "keep": "model"});
        rename_fields(&mut value, &[("model".into(), "model_id".into())]);
        assert_eq!(
            value,
            json!({"model_id": "m", "messages": [{"model_id": "inner", "x": {"model_id": 1}}], "keep": "model"})
        );
    }
}
