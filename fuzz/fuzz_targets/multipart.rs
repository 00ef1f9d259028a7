//! The form reader (`src/http/multipart.rs`) on arbitrary bodies: it decides which model a
//! limited key's audio or image request names, so it must be exact, not just not crash.
//!
//! Properties:
//! - every part's data is a slice of the body, and the form's parts, written back with
//!   the same boundary, read back the same;
//! - `field` agrees with `parts`: a value only when exactly one part has that name, and
//!   `Repeated` when more than one does.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice::http::multipart::{FormError, field, parts};

fuzz_target!(|input: &[u8]| {
    // The first line is the boundary, the rest the body.
    let Some(split) = input.iter().position(|b| *b == b'\n') else {
        return;
    };
    let Ok(boundary) = std::str::from_utf8(&input[..split]) else {
        return;
    };
    if boundary.is_empty() || boundary.len() > 70 || boundary.contains(['\r', '\n']) {
        return;
    }
    let body = Bytes::copy_from_slice(&input[split + 1..]);
    let Ok(found) = parts(&body, boundary) else {
        return;
    };
    let mut written = Vec::new();
    for part in &found {
        assert!(part.data.len() <= body.len());
        written.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        written.extend_from_slice(b"Content-Disposition: form-data; name=\"");
        written.extend_from_slice(part.name.as_bytes());
        written.push(b'"');
        if let Some(filename) = &part.filename {
            written.extend_from_slice(format!("; filename=\"{filename}\"").as_bytes());
        }
        written.extend_from_slice(b"\r\n\r\n");
        written.extend_from_slice(&part.data);
        written.extend_from_slice(b"\r\n");
    }
    written.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    // Names or data that hold the delimiter or quotes cannot be written back as they were.
    let clean = found.iter().all(|p| {
        !p.name.contains(['"', ';', '\r', '\n'])
            && p.filename
                .as_deref()
                .is_none_or(|f| !f.contains(['"', ';', '\r', '\n']))
            && !p
                .data
                .windows(boundary.len() + 2)
                .any(|w| &w[2..] == boundary.as_bytes() && &w[..2] == b"--")
    });
    if clean {
        let again = parts(&Bytes::from(written), boundary).expect("a written form reads back");
        assert_eq!(again.len(), found.len());
        for (a, b) in again.iter().zip(&found) {
            assert_eq!(a.name, b.name);
            assert_eq!(a.data, b.data);
        }
    }
    let named = found.iter().filter(|p| p.name == "model").count();
    match field(&body, boundary, "model") {
        Ok(Some(_)) => assert_eq!(named, 1),
        Ok(None) => assert_eq!(named, 0),
        Err(FormError::Repeated) => assert!(named > 1),
        Err(FormError::NotText) => assert!(named >= 1),
        Err(other) => panic!("parts read the form but field says {other:?}"),
    }
});
