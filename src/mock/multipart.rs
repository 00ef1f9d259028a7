//! Just enough `multipart/form-data` parsing for the mock to see uploaded files and fields.

use bytes::Bytes;

#[derive(Debug, Clone)]
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub data: Bytes,
}

/// The boundary from a `multipart/form-data; boundary=…` content type.
pub fn boundary(content_type: &str) -> Option<String> {
    content_type.split(';').map(str::trim).find_map(|param| {
        let value = param.strip_prefix("boundary=")?;
        Some(value.trim_matches('"').to_string())
    })
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from >= haystack.len() {
        return None;
    }
    haystack[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Splits a body into its parts; malformed input yields the parts found so far.
pub fn parse(body: &Bytes, boundary: &str) -> Vec<Part> {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut parts = Vec::new();
    let Some(mut position) = find(body, delimiter, 0) else {
        return parts;
    };
    loop {
        let header_start = position + delimiter.len();
        if body.get(header_start..header_start + 2) == Some(b"--") {
            break;
        }
        let header_start = header_start + 2; // CRLF after the delimiter
        let Some(header_end) = find(body, b"\r\n\r\n", header_start) else {
            break;
        };
        let headers = String::from_utf8_lossy(&body[header_start..header_end]).into_owned();
        let data_start = header_end + 4;
        let Some(next) = find(body, delimiter, data_start) else {
            break;
        };
        let data_end = next.saturating_sub(2).max(data_start); // CRLF before the delimiter
        let disposition = headers
            .lines()
            .find(|line| line.to_ascii_lowercase().starts_with("content-disposition"))
            .unwrap_or_default();
        let param = |key: &str| {
            disposition.split(';').map(str::trim).find_map(|p| {
                p.strip_prefix(key)
                    .and_then(|v| v.strip_prefix('='))
                    .map(|v| v.trim_matches('"').to_string())
            })
        };
        parts.push(Part {
            name: param("name").unwrap_or_default(),
            filename: param("filename"),
            data: body.slice(data_start..data_end),
        });
        position = next;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_and_files() {
        let body = Bytes::from_static(
            b"--XX\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n{\"a\":1}\n\r\n--XX--\r\n",
        );
        let parts = parse(
            &body,
            &boundary("multipart/form-data; boundary=XX").unwrap(),
        );
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "purpose");
        assert_eq!(&parts[0].data[..], b"batch");
        assert_eq!(parts[1].filename.as_deref(), Some("a.jsonl"));
        assert_eq!(&parts[1].data[..], b"{\"a\":1}\n");
    }
}
