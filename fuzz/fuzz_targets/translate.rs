//! The stream and answer translators (`src/protocol/translate.rs`) on arbitrary upstream
//! bodies, for every pair of client and upstream APIs.
//!
//! Input: a flags byte (which pair; stream, answer or error), a cut count and cut points,
//! then the body.
//! Properties:
//! - nothing panics, whatever the upstream sends;
//! - how the upstream chunked the body does not change what the client gets;
//! - a stream's output is whole SSE events, each `data:` JSON (or `[DONE]`);
//! - an answer or an error is one JSON document, whatever came in.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice::protocol::translate::{AnswerKind, Translator, Wire};

const PAIRS: [(Wire, Wire); 6] = [
    (Wire::OpenAiChat, Wire::AnthropicMessages),
    (Wire::OpenAiChat, Wire::Gemini),
    (Wire::AnthropicMessages, Wire::OpenAiChat),
    (Wire::AnthropicMessages, Wire::Gemini),
    (Wire::AnthropicMessages, Wire::AnthropicMessages),
    (Wire::OpenAiChat, Wire::OpenAiChat),
];

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
    let (client, upstream) = PAIRS[usize::from(flags) % PAIRS.len()];
    let kind = match (flags / 8) % 3 {
        0 => AnswerKind::Stream,
        1 => AnswerKind::Json,
        _ => AnswerKind::Error { status: 429 },
    };
    let usage_asked = flags & 0x80 != 0;
    let whole = run(client, upstream, kind, usage_asked, body, &[]);
    let mut cuts: Vec<usize> = cut_data
        .chunks(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (body.len() + 1))
        .collect();
    cuts.sort_unstable();
    let pieces = run(client, upstream, kind, usage_asked, body, &cuts);
    assert!(
        whole == pieces,
        "the output depends on how the body was chunked"
    );
    let text = String::from_utf8_lossy(&whole);
    match kind {
        AnswerKind::Stream => {
            assert!(text.is_empty() || text.ends_with("\n\n"), "{text:?}");
            for event in text.split("\n\n").filter(|e| !e.is_empty()) {
                let data = event.lines().find_map(|l| l.strip_prefix("data: "));
                assert!(
                    data.is_some_and(|d| d == "[DONE]" || serde_json::from_str::<Value>(d).is_ok()),
                    "{event:?}"
                );
            }
        }
        AnswerKind::Json => {
            // A body that is not JSON is relayed as it came; one that is comes out JSON.
            if serde_json::from_slice::<Value>(body).is_ok() {
                assert!(serde_json::from_slice::<Value>(&whole).is_ok(), "{text:?}");
            }
        }
        AnswerKind::Error { .. } => {
            assert!(serde_json::from_slice::<Value>(&whole).is_ok(), "{text:?}");
        }
    }
});

fn run(
    client: Wire,
    upstream: Wire,
    kind: AnswerKind,
    usage_asked: bool,
    body: &[u8],
    cuts: &[usize],
) -> Vec<u8> {
    let mut translator = Translator::new(client, upstream, kind, "alias", usage_asked, 1);
    let mut out = BytesMut::new();
    let mut from = 0;
    for &cut in cuts {
        let cut = cut.max(from);
        match translator.push(&body[from..cut]) {
            Ok(bytes) => out.extend_from_slice(&bytes),
            Err(_) => return out.to_vec(),
        }
        from = cut;
    }
    match translator.push(&body[from..]) {
        Ok(bytes) => out.extend_from_slice(&bytes),
        Err(_) => return out.to_vec(),
    }
    out.extend_from_slice(&translator.finish());
    out.to_vec()
}
