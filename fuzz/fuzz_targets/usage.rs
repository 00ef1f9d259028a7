//! Usage extraction (`src/pure/usage.rs`) on arbitrary upstream replies: JSON bodies, SSE
//! streams and their reassembly, and the tokenizer fallback.
//!
//! Properties:
//! - what is reassembled is bounded by what came in (text, tool calls);
//! - a stream reads the same with `\n` or `\r\n` line ends;
//! - a JSON reply and the same JSON sent as one SSE event give the same usage;
//! - token counts and totals do not overflow (debug assertions are on in fuzz builds).

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice::pure::usage::{Reply, estimate, read_json_reply, read_stream_reply};

/// Tool calls a stream can make (`pure/usage.rs` caps the index at 128).
const MAX_TOOL_CALLS: usize = 129;

fn size(reply: &Reply) -> usize {
    reply.text.as_ref().map_or(0, String::len)
        + reply
            .tool_calls
            .iter()
            .map(|c| {
                ["/id", "/function/name", "/function/arguments"]
                    .iter()
                    .filter_map(|p| c.pointer(p).and_then(Value::as_str))
                    .map(str::len)
                    .sum::<usize>()
            })
            .sum::<usize>()
}

fn same(a: &Reply, b: &Reply) -> bool {
    a.usage == b.usage && a.text == b.text && a.tool_calls == b.tool_calls
}

fuzz_target!(|data: &[u8]| {
    let json = read_json_reply(data);
    // Every byte of a reassembled reply comes from a string in the input: escapes only
    // shrink, and a lossy decoding at most triples an invalid byte.
    assert!(size(&json) <= data.len() * 3, "the JSON reply grew");

    let stream = read_stream_reply(data);
    assert!(
        stream.tool_calls.len() <= MAX_TOOL_CALLS,
        "unbounded tool calls"
    );
    assert!(
        size(&stream) <= data.len() * 3,
        "the reassembled stream grew"
    );

    let crlf: Vec<u8> = data
        .iter()
        .flat_map(|&b| {
            if b == b'\n' {
                vec![b'\r', b'\n']
            } else {
                vec![b]
            }
        })
        .collect();
    assert!(
        same(&stream, &read_stream_reply(&crlf)),
        "CRLF line ends read differently"
    );

    if let Ok(value @ Value::Object(_)) = serde_json::from_slice::<Value>(data) {
        let completed = value.get("type").and_then(Value::as_str) == Some("response.completed");
        if !completed {
            let event = format!("data: {value}\n\ndata: [DONE]\n\n");
            assert_eq!(
                read_stream_reply(event.as_bytes()).usage,
                json.usage,
                "a reply and the same reply as an SSE event disagree on usage"
            );
        }
        // The tokenizer fallback, on small inputs (its cost grows faster than linearly).
        if data.len() <= 4096 {
            let model = value
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("gpt-4o");
            let usage = estimate(model, Some(&value), &stream);
            assert_eq!(usage.total, usage.prompt + usage.completion);
        }
    }
    for usage in [json.usage, stream.usage].into_iter().flatten() {
        // What the log and the limiter add up must not wrap.
        let _ = usage
            .prompt
            .checked_add(usage.completion)
            .expect("prompt + completion overflows");
    }
});
