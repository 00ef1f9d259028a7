//! The response shaper (`src/pure/shape.rs`) on arbitrary upstream bodies.
//!
//! Input: a flags byte, a cut count and cut points, then the body.
//! Properties:
//! - how the upstream chunked the body does not change what the client gets: the output
//!   for the body pushed in arbitrary pieces equals the output for the body pushed whole;
//! - with nothing to rename or strip, the body passes through byte for byte;
//! - the usage chunk sluice asked for never reaches the client when it is to be stripped;
//! - a renamed JSON body carries the client's model name;
//! - an SSE event that never ends is not held in memory without bound (flood mode).

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice::pure::shape::{ModelRename, Shaper};

/// The most an event (or a JSON body) may hold back before it is relayed unshaped: the
/// limit `pure/shape.rs` uses for JSON bodies.
const EVENT_LIMIT: usize = 16 * 1024 * 1024;
const ALIAS: &str = "client-alias";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&cut_count, rest)) = rest.split_first() else {
        return;
    };
    let cut_bytes = usize::from(cut_count % 16) * 2;
    if rest.len() < cut_bytes {
        return;
    }
    let (cut_data, body) = rest.split_at(cut_bytes);
    let sse = flags & 1 != 0;
    let rename = (flags & 2 != 0).then(|| ModelRename { to: ALIAS.into() });
    let strip = flags & 4 != 0;
    if flags & 0xf8 == 0xf8 {
        // Pushing 32 MiB costs seconds in an unoptimised build: once per run is enough
        // (a seed asks for it, so every run checks it).
        static FLOODED: std::sync::Once = std::sync::Once::new();
        FLOODED.call_once(|| flood(sse, rename, strip, body));
        return;
    }

    let whole = run(sse, rename.clone(), strip, body, &[]);
    let mut cuts: Vec<usize> = cut_data
        .chunks(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (body.len() + 1))
        .collect();
    cuts.sort_unstable();
    let pieces = run(sse, rename.clone(), strip, body, &cuts);
    assert!(
        whole == pieces,
        "the output depends on how the body was chunked (cuts {cuts:?}):\nwhole:  {:?}\npieces: {:?}",
        String::from_utf8_lossy(&whole),
        String::from_utf8_lossy(&pieces)
    );

    if rename.is_none() && (!strip || !sse) {
        assert!(whole == body, "nothing to shape, yet the body changed");
    }
    if std::str::from_utf8(body).is_ok() {
        assert!(
            std::str::from_utf8(&whole).is_ok(),
            "valid UTF-8 in, invalid out"
        );
        if sse && strip {
            for line in String::from_utf8_lossy(&whole).lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                if let Ok(value) = serde_json::from_str::<Value>(data.trim()) {
                    let usage_only = value
                        .get("choices")
                        .and_then(Value::as_array)
                        .is_some_and(Vec::is_empty)
                        && value.get("usage").is_some_and(Value::is_object);
                    assert!(!usage_only, "the usage chunk reached the client: {line}");
                }
            }
        }
    }
    if !sse && rename.is_some() {
        if let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) {
            if object.get("model").is_some_and(Value::is_string) {
                let out: Value = serde_json::from_slice(&whole).expect("renamed JSON is JSON");
                assert_eq!(out["model"], ALIAS, "the JSON body's model was not renamed");
            }
        }
    }
});

/// Pushes `body` cut at `cuts` (sorted offsets), then finishes.
fn run(
    sse: bool,
    rename: Option<ModelRename>,
    strip: bool,
    body: &[u8],
    cuts: &[usize],
) -> Vec<u8> {
    let mut shaper = Shaper::new(sse, rename, strip);
    let mut out = Vec::with_capacity(body.len());
    let mut at = 0;
    for &cut in cuts.iter().chain(std::iter::once(&body.len())) {
        if cut < at {
            continue;
        }
        match shaper.push(Bytes::copy_from_slice(&body[at..cut])) {
            Ok(shaped) => out.extend_from_slice(&shaped),
            // The stream ends there (inputs here are far below the event bound).
            Err(too_large) => panic!("{too_large} for a {} byte body", body.len()),
        }
        at = cut;
    }
    out.extend_from_slice(&shaper.finish());
    out
}

/// An upstream that sends one event that never ends (no blank line), 8 MiB at a time: the
/// shaper must start relaying once it holds `EVENT_LIMIT`, not keep buffering.
fn flood(sse: bool, rename: Option<ModelRename>, strip: bool, body: &[u8]) {
    let mut unit: Vec<u8> = body.iter().copied().filter(|&b| b != b'\n').collect();
    if unit.is_empty() {
        unit = b"data: {\"model\":\"x\"".to_vec();
    }
    let chunk: Bytes = unit
        .iter()
        .copied()
        .cycle()
        .take(8 << 20)
        .collect::<Vec<u8>>()
        .into();
    let mut shaper = Shaper::new(sse, rename, strip);
    // Bytes given up: an SSE event past the bound ends the stream and is let go.
    let (mut sent, mut relayed, mut dropped) = (0usize, 0usize, 0usize);
    for _ in 0..4 {
        sent += chunk.len();
        match shaper.push(chunk.clone()) {
            Ok(out) => relayed += out.len(),
            Err(_) => dropped = sent - relayed,
        }
        assert!(
            sent - (relayed + dropped).min(sent) <= EVENT_LIMIT + chunk.len(),
            "the shaper holds {} MiB of one unfinished event (sse: {sse})",
            (sent - relayed - dropped) >> 20
        );
    }
}
