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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
