//! Reads one text field of a `multipart/form-data` body (RFC 7578). Audio and image
//! requests name their model in a form field; an allow-list or a budget must see that
//! model whatever the client declared, so a form that cannot be read is refused rather
//! than waved through.

/// Why a form could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormError {
    /// No `boundary` parameter in the content type.
    NoBoundary,
    /// The body does not follow the form's structure.
    Malformed,
    /// The field appears more than once: which one an upstream takes is not ours to guess.
    Repeated,
    /// The field's value is not UTF-8 text.
    NotText,
}

impl std::fmt::Display for FormError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NoBoundary => "the multipart content type has no boundary",
            Self::Malformed => "the multipart body is malformed",
            Self::Repeated => "a form field appears more than once",
            Self::NotText => "a form field is not UTF-8 text",
        })
    }
}

/// The boundary of a `multipart/form-data` content type, or `None` if it is another type.
pub fn boundary(content_type: &str) -> Option<Result<&str, FormError>> {
    let mut params = content_type.split(';');
    let kind = params.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let found = params.find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"'))
    });
    Some(match found {
        Some(b) if !b.is_empty() && b.len() <= 200 => Ok(b),
        _ => Err(FormError::NoBoundary),
    })
}

/// One part of a form.
#[derive(Debug, Clone)]
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub data: bytes::Bytes,
}

/// Every part of a form, or why it cannot be read.
pub fn parts(body: &bytes::Bytes, boundary: &str) -> Result<Vec<Part>, FormError> {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut at = find(body, delimiter).ok_or(FormError::Malformed)? + delimiter.len();
    let mut parts = Vec::new();
    loop {
        // After a delimiter: `--` closes the form, else a line break opens a part.
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            return Ok(parts);
        }
        let head_start =
            at + (rest.len() - strip_line_break(rest).ok_or(FormError::Malformed)?.len());
        let head_len = find(&body[head_start..], b"\r\n\r\n").ok_or(FormError::Malformed)?;
        let head = &body[head_start..head_start + head_len];
        let data_start = head_start + head_len + 4;
        let end = find(&body[data_start..], delimiter).ok_or(FormError::Malformed)?;
        // The part's content ends before the line break that precedes the delimiter.
        if !body[data_start..data_start + end].ends_with(b"\r\n") {
            return Err(FormError::Malformed);
        }
        parts.push(Part {
            name: disposition_param(head, "name").unwrap_or_default(),
            filename: disposition_param(head, "filename"),
            data: body.slice(data_start..data_start + end - 2),
        });
        at = data_start + end + delimiter.len();
    }
}

/// The value of the form field `name`, if the form has one.
pub fn field(body: &bytes::Bytes, boundary: &str, name: &str) -> Result<Option<String>, FormError> {
    let mut value = None;
    for part in parts(body, boundary)? {
        if part.name != name {
            continue;
        }
        if value.is_some() {
            return Err(FormError::Repeated);
        }
        let text = std::str::from_utf8(&part.data).map_err(|_| FormError::NotText)?;
        value = Some(text.to_string());
    }
    Ok(value)
}

/// A parameter (`name`, `filename`) of a part's `Content-Disposition: form-data` header.
fn disposition_param(head: &[u8], param: &str) -> Option<String> {
    let head = std::str::from_utf8(head).ok()?;
    head.split("\r\n").find_map(|line| {
        let (header, value) = line.split_once(':')?;
        if !header.trim().eq_ignore_ascii_case("content-disposition") {
            return None;
        }
        value.split(';').skip(1).find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key.trim().eq_ignore_ascii_case(param))
                .then(|| value.trim().trim_matches('"').to_string())
        })
    })
}

fn strip_line_break(bytes: &[u8]) -> Option<&[u8]> {
    // Transport padding (spaces, tabs) may follow a delimiter before its line break.
    let start = bytes.iter().position(|b| *b != b' ' && *b != b'\t')?;
    bytes[start..].strip_prefix(b"\r\n")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(parts: &[(&str, &str)]) -> bytes::Bytes {
        let mut body = Vec::new();
        for (name, value) in parts {
            body.extend_from_slice(
                format!(
                    "--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                )
                .as_bytes(),
            );
        }
        body.extend_from_slice(b"--XyZ--\r\n");
        body.into()
    }

    #[test]
    fn boundaries_come_from_the_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=XyZ"),
            Some(Ok("XyZ"))
        );
        assert_eq!(
            boundary("Multipart/Form-Data; charset=x; boundary=\"a b\""),
            Some(Ok("a b"))
        );
        assert_eq!(
            boundary("multipart/form-data"),
            Some(Err(FormError::NoBoundary))
        );
        assert_eq!(boundary("application/json"), None);
    }

    #[test]
    fn files_and_fields_are_parts() {
        let body = bytes::Bytes::from_static(
            b"--XX\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n{\"a\":1}\n\r\n--XX--\r\n",
        );
        let parts = parts(&body, "XX").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "purpose");
        assert_eq!(&parts[0].data[..], b"batch");
        assert_eq!(parts[1].filename.as_deref(), Some("a.jsonl"));
        assert_eq!(&parts[1].data[..], b"{\"a\":1}\n");
    }

    #[test]
    fn a_field_is_found_among_others() {
        let body = form(&[("file", "RIFF....binary"), ("model", "whisper-1")]);
        assert_eq!(
            field(&body, "XyZ", "model"),
            Ok(Some("whisper-1".to_string()))
        );
        assert_eq!(field(&body, "XyZ", "language"), Ok(None));
    }

    #[test]
    fn repeated_truncated_or_foreign_forms_are_refused() {
        let body = form(&[("model", "gpt-4o-mini"), ("model", "gpt-4o")]);
        assert_eq!(field(&body, "XyZ", "model"), Err(FormError::Repeated));
        let body = form(&[("model", "gpt-4o")]);
        assert_eq!(
            field(&body.slice(..body.len() - 12), "XyZ", "model"),
            Err(FormError::Malformed)
        );
        assert_eq!(
            field(
                &bytes::Bytes::from_static(b"{\"model\":\"gpt-4o\"}"),
                "XyZ",
                "model"
            ),
            Err(FormError::Malformed)
        );
        assert_eq!(field(&body, "other", "model"), Err(FormError::Malformed));
    }
}
