//! Response shaping for a relayed body: the work that must look inside an upstream's
//! answer while it streams. The model alias is put back (the client sees the name it asked
//! for), and the usage chunk sluice requested on the client's behalf is removed. SSE bodies
//! are cut into events at blank lines and each event is handled as soon as it is complete,
//! so nothing is held back longer than one event.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// Responses larger than this are relayed unshaped rather than held in memory.
const JSON_LIMIT: usize = 16 * 1024 * 1024;
/// The largest SSE event sluice holds while waiting for its blank line. Real events are
/// far smaller (a Responses API `response.completed` with a long reply is a few hundred
/// KiB); an upstream that sends more without ending the event is broken or hostile.
pub const MAX_EVENT: usize = 8 * 1024 * 1024;

/// An SSE event grew past [`MAX_EVENT`] without its blank line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTooLarge;

impl std::fmt::Display for EventTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the upstream sent a server-sent event larger than {} MiB",
            MAX_EVENT / (1024 * 1024)
        )
    }
}

/// Puts the client's model name back where the upstream wrote its own.
#[derive(Debug, Clone)]
pub struct ModelRename {
    pub to: String,
}

impl ModelRename {
    fn apply(&self, value: &mut Value) -> bool {
        let mut changed = false;
        for pointer in ["/model", "/response/model", "/message/model"] {
            if let Some(slot) = value.pointer_mut(pointer) {
                if slot.is_string() && slot.as_str() != Some(self.to.as_str()) {
                    *slot = Value::String(self.to.clone());
                    changed = true;
                }
            }
        }
        // A model object (`GET /v1/models/{alias}`) names itself in `id`.
        if value.get("object").and_then(Value::as_str) == Some("model") {
            if let Some(slot) = value.get_mut("id").filter(|id| id.is_string()) {
                if slot.as_str() != Some(self.to.as_str()) {
                    *slot = Value::String(self.to.clone());
                    changed = true;
                }
            }
        }
        changed
    }
}

#[derive(Debug)]
pub struct Shaper {
    sse: bool,
    buffer: BytesMut,
    rename: Option<ModelRename>,
    /// Drop the usage-only chunk sluice asked for on the client's behalf.
    strip_usage: bool,
    /// Gave up shaping (too large); the rest passes through.
    bypass: bool,
    /// How much of `buffer` is known to hold no event end, so each chunk is scanned once.
    scanned: usize,
}

impl Shaper {
    pub fn new(sse: bool, rename: Option<ModelRename>, strip_usage: bool) -> Self {
        Self {
            sse,
            buffer: BytesMut::new(),
            rename,
            strip_usage: strip_usage && sse,
            bypass: false,
            scanned: 0,
        }
    }

    /// Takes a chunk; returns what can be sent now (possibly empty), or an error when an
    /// SSE event outgrows [`MAX_EVENT`] (the stream must then end).
    pub fn push(&mut self, chunk: Bytes) -> Result<Bytes, EventTooLarge> {
        if self.bypass {
            return Ok(chunk);
        }
        self.buffer.extend_from_slice(&chunk);
        if !self.sse {
            if self.buffer.len() > JSON_LIMIT {
                self.bypass = true;
                return Ok(self.buffer.split().freeze());
            }
            return Ok(Bytes::new());
        }
        // The buffer before `scanned` holds no event end; a terminator may straddle the
        // boundary by up to three bytes (`\r\n\r\n`).
        let from = self.scanned.saturating_sub(3);
        let Some(end) = last_event_end(&self.buffer[from..]).map(|end| end + from) else {
            self.scanned = self.buffer.len();
            if self.buffer.len() > MAX_EVENT {
                self.buffer = BytesMut::new();
                self.scanned = 0;
                self.bypass = true;
                return Err(EventTooLarge);
            }
            return Ok(Bytes::new());
        };
        let complete = self.buffer.split_to(end).freeze();
        self.scanned = self.buffer.len();
        Ok(self.shape_events(&complete))
    }

    /// The rest, at the end of the body.
    pub fn finish(&mut self) -> Bytes {
        let rest = self.buffer.split().freeze();
        if self.bypass || rest.is_empty() {
            return rest;
        }
        if self.sse {
            return self.shape_events(&rest);
        }
        let Some(rename) = &self.rename else {
            return rest;
        };
        let Ok(mut value) = serde_json::from_slice::<Value>(&rest) else {
            return rest;
        };
        if rename.apply(&mut value) {
            serde_json::to_vec(&value).map_or(rest, Bytes::from)
        } else {
            rest
        }
    }

    fn shape_events(&self, events: &Bytes) -> Bytes {
        let mut out = BytesMut::with_capacity(events.len() + 16);
        let mut changed = false;
        let mut rest = &events[..];
        while !rest.is_empty() {
            let end = first_event_end(rest).unwrap_or(rest.len());
            let (event, tail) = rest.split_at(end);
            rest = tail;
            // Each event on its own: one that is not text passes as it is and leaves the
            // others shaped, however the stream was cut into reads.
            match std::str::from_utf8(event)
                .ok()
                .and_then(|e| self.shape_event(e))
            {
                Some(shaped) => {
                    changed = true;
                    out.extend_from_slice(shaped.as_bytes());
                }
                None => out.extend_from_slice(event),
            }
        }
        if changed {
            out.freeze()
        } else {
            events.clone()
        }
    }

    /// The event as the client must see it (empty: dropped), or `None` if unchanged.
    fn shape_event(&self, event: &str) -> Option<String> {
        if self.strip_usage && is_usage_only(event) {
            return Some(String::new());
        }
        let rename = self.rename.as_ref()?;
        let mut out = String::with_capacity(event.len() + 16);
        let mut changed = false;
        for line in event.split_inclusive('\n') {
            let shaped = line.strip_prefix("data:").and_then(|data| {
                let payload = data.trim();
                if !payload.starts_with('{') {
                    return None;
                }
                let mut value: Value = serde_json::from_str(payload).ok()?;
                rename.apply(&mut value).then(|| value.to_string())
            });
            match shaped {
                Some(json) => {
                    changed = true;
                    out.push_str("data: ");
                    out.push_str(&json);
                    out.push_str(if line.ends_with("\r\n") { "\r\n" } else { "\n" });
                }
                None => out.push_str(line),
            }
        }
        changed.then_some(out)
    }
}

/// The end of the first SSE event in `bytes` (just after its blank line: `\n\n`,
/// `\r\n\r\n` or `\n\r\n`), found in one pass.
pub fn first_event_end(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(offset) = bytes[from..].iter().position(|&b| b == b'\n') {
        let at = from + offset;
        match bytes.get(at + 1) {
            Some(b'\n') => return Some(at + 2),
            Some(b'\r') if bytes.get(at + 2) == Some(&b'\n') => return Some(at + 3),
            _ => {}
        }
        from = at + 1;
    }
    None
}

/// The chunk `stream_options.include_usage` adds: no choices, only usage.
fn is_usage_only(event: &str) -> bool {
    // Every chunk of such a stream carries `"usage":null`; only the last one has an object.
    // Checking that without parsing keeps the common chunk cheap.
    if !has_usage_object(event) {
        return false;
    }
    event
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .any(|data| {
            serde_json::from_str::<Value>(data.trim()).is_ok_and(|value| {
                value
                    .get("choices")
                    .and_then(Value::as_array)
                    .is_some_and(Vec::is_empty)
                    && value.get("usage").is_some_and(Value::is_object)
            })
        })
}

/// Whether `"usage"` is followed by an object (`"usage": {`), by a byte scan.
fn has_usage_object(event: &str) -> bool {
    event.match_indices("\"usage\"").any(|(at, key)| {
        let rest = event[at + key.len()..].trim_start();
        rest.strip_prefix(':')
            .is_some_and(|value| value.trim_start().starts_with('{'))
    })
}

/// The end of the last complete SSE event in `buffer` (just after its blank line).
fn last_event_end(buffer: &[u8]) -> Option<usize> {
    let mut last = None;
    let mut from = 0;
    while let Some(end) = first_event_end(&buffer[from..]) {
        from += end;
        last = Some(from);
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rename() -> ModelRename {
        ModelRename { to: "alias".into() }
    }

    #[test]
    fn sse_events_are_renamed_as_soon_as_complete() {
        let mut shaper = Shaper::new(true, Some(rename()), false);
        let first = shaper
            .push(Bytes::from_static(
                b"data: {\"model\":\"real\",\"n\":1}\n\ndata: {\"mod",
            ))
            .unwrap();
        assert_eq!(&first[..], b"data: {\"model\":\"alias\",\"n\":1}\n\n");
        let second = shaper
            .push(Bytes::from_static(b"el\":\"real\"}\n\ndata: [DONE]\n\n"))
            .unwrap();
        assert_eq!(
            &second[..],
            b"data: {\"model\":\"alias\"}\n\ndata: [DONE]\n\n"
        );
        assert!(shaper.finish().is_empty());
    }

    #[test]
    fn responses_api_events_carry_the_model_inside_response() {
        let mut shaper = Shaper::new(true, Some(rename()), false);
        let out = shaper
            .push(Bytes::from_static(
                b"event: response.created\ndata: {\"response\":{\"model\":\"real\"}}\n\n",
            ))
            .unwrap();
        assert_eq!(
            &out[..],
            b"event: response.created\ndata: {\"response\":{\"model\":\"alias\"}}\n\n"
        );
    }

    #[test]
    fn the_usage_chunk_sluice_asked_for_is_removed() {
        let mut shaper = Shaper::new(true, None, true);
        let out = shaper.push(Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\ndata: [DONE]\n\n",
        )).unwrap();
        assert_eq!(
            &out[..],
            b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\ndata: [DONE]\n\n"
        );
    }

    #[test]
    fn only_a_usage_object_makes_a_chunk_worth_parsing() {
        assert!(!has_usage_object(
            "data: {\"choices\":[],\"usage\":null}\n\n"
        ));
        assert!(has_usage_object(
            "data: {\"choices\":[],\"usage\" : {\"total_tokens\":1}}\n\n"
        ));
    }

    #[test]
    fn events_split_anywhere_shape_alike_and_each_byte_is_scanned_once() {
        let input: &[u8] = b"data: {\"model\":\"real\",\"n\":1}\r\n\r\ndata: {\"model\":\"real\"}\n\ndata: [DONE]\n\n";
        let mut whole = Shaper::new(true, Some(rename()), false);
        let mut expected = whole.push(Bytes::from_static(input)).unwrap().to_vec();
        expected.extend_from_slice(&whole.finish());
        for size in 1..input.len() {
            let mut shaper = Shaper::new(true, Some(rename()), false);
            let mut out = Vec::new();
            for piece in input.chunks(size) {
                out.extend_from_slice(&shaper.push(Bytes::copy_from_slice(piece)).unwrap());
            }
            out.extend_from_slice(&shaper.finish());
            assert_eq!(out, expected, "pieces of {size}");
        }
    }

    #[test]
    fn an_event_that_is_not_text_leaves_its_neighbours_shaped() {
        let mut shaper = Shaper::new(true, Some(rename()), true);
        let out = shaper
            .push(Bytes::from_static(
                b"data: {\"model\":\"real\",\"x\":\"\xff\"}\n\ndata: {\"model\":\"real\"}\n\ndata: {\"choices\":[],\"usage\":{\"total_tokens\":1}}\n\n",
            ))
            .unwrap();
        assert_eq!(
            &out[..],
            b"data: {\"model\":\"real\",\"x\":\"\xff\"}\n\ndata: {\"model\":\"alias\"}\n\n"
        );
    }

    #[test]
    fn many_events_in_one_read_are_split_in_one_pass() {
        let mut input = Vec::new();
        for _ in 0..20_000 {
            input.extend_from_slice(b"data: {\"model\":\"real\"}\r\n\r\n");
        }
        let mut shaper = Shaper::new(true, Some(rename()), false);
        let out = shaper.push(Bytes::from(input)).unwrap();
        assert_eq!(
            out.len(),
            20_000 * "data: {\"model\":\"alias\"}\r\n\r\n".len()
        );
    }

    #[test]
    fn an_event_without_end_is_bounded() {
        let mut shaper = Shaper::new(true, Some(rename()), false);
        let piece = Bytes::from(vec![b'x'; 8 * 1024]);
        let mut refused = false;
        for _ in 0..(MAX_EVENT / piece.len() + 2) {
            if shaper.push(piece.clone()).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "an endless event must be refused");
        assert!(shaper.buffer.capacity() < 1024, "its bytes are released");
    }

    #[test]
    fn json_bodies_are_renamed_at_the_end() {
        let mut shaper = Shaper::new(false, Some(rename()), false);
        assert!(
            shaper
                .push(Bytes::from_static(b"{\"model\":"))
                .unwrap()
                .is_empty()
        );
        assert!(
            shaper
                .push(Bytes::from_static(b"\"real\",\"id\":1}"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(&shaper.finish()[..], b"{\"model\":\"alias\",\"id\":1}");
    }
}

/// Property tests: however an SSE body is cut into reads, it is shaped alike, and every
/// event comes out once, in order.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    /// One generated event: its bytes, and the number it carries (`None`: a usage-only
    /// chunk or a comment, which carry none).
    #[derive(Debug, Clone)]
    struct Event {
        bytes: Vec<u8>,
        kind: Kind,
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Kind {
        Chunk,
        Usage,
        Comment,
    }

    /// Lines ended by `\n` or `\r\n`, then a blank line of either: every terminator the
    /// splitter knows (`\n\n`, `\r\n\r\n`, `\n\r\n`, `\r\n\n`).
    fn event(number: usize) -> impl Strategy<Value = Event> {
        let kind =
            prop_oneof![6 => Just(Kind::Chunk), 1 => Just(Kind::Usage), 1 => Just(Kind::Comment)];
        // Text that must be escaped in JSON, and a character of two bytes.
        let alphabet = vec!['a', 'z', ' ', '\n', '\r', '"', '{', '}', ':', 'é', '\\'];
        let text = proptest::collection::vec(proptest::sample::select(alphabet), 0..12)
            .prop_map(String::from_iter);
        (kind, text, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            move |(kind, text, crlf, blank_crlf, named)| {
                let end = if crlf { "\r\n" } else { "\n" };
                let mut lines = Vec::new();
                if named {
                    lines.push("event: message".to_string());
                }
                match kind {
                    Kind::Chunk => lines.push(format!(
                        "data: {}",
                        json!({"model": "real", "n": number, "choices": [{"delta": {"content": text}}], "usage": null})
                    )),
                    Kind::Usage => lines.push(format!(
                        "data: {}",
                        json!({"model": "real", "choices": [], "usage": {"total_tokens": 3}})
                    )),
                    Kind::Comment => lines.push(": keep-alive".to_string()),
                }
                let mut bytes = String::new();
                for line in lines {
                    bytes.push_str(&line);
                    bytes.push_str(end);
                }
                bytes.push_str(if blank_crlf { "\r\n" } else { "\n" });
                Event {
                    bytes: bytes.into_bytes(),
                    kind,
                }
            },
        )
    }

    fn events() -> impl Strategy<Value = Vec<Event>> {
        (0usize..12).prop_flat_map(|count| (0..count).map(event).collect::<Vec<_>>())
    }

    fn shaper(rename: bool, strip: bool) -> Shaper {
        let rename = rename.then(|| ModelRename { to: "alias".into() });
        Shaper::new(true, rename, strip)
    }

    /// What the shaper lets out for `body` handed over whole.
    fn shape_whole(body: &[u8], rename: bool, strip: bool) -> Vec<u8> {
        let mut shaper = shaper(rename, strip);
        let mut out = shaper
            .push(Bytes::copy_from_slice(body))
            .unwrap_or_default()
            .to_vec();
        out.extend_from_slice(&shaper.finish());
        out
    }

    /// What the shaper lets out for `body` cut at `cuts` (positions, any order), checking
    /// after each read that every event complete so far (`ends`: where events end) has
    /// come out, and nothing more.
    fn shape_cut(
        body: &[u8],
        ends: &[usize],
        cuts: &[usize],
        rename: bool,
        strip: bool,
    ) -> Vec<u8> {
        let mut shaper = shaper(rename, strip);
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut from = 0;
        for cut in cuts.into_iter().chain([body.len()]) {
            let shaped = shaper.push(Bytes::copy_from_slice(&body[from..cut]));
            from = cut;
            assert!(shaped.is_ok(), "small events are never refused");
            out.extend_from_slice(&shaped.unwrap_or_default());
            let complete = ends
                .iter()
                .copied()
                .filter(|&end| end <= cut)
                .max()
                .unwrap_or(0);
            assert_eq!(
                out,
                shape_whole(&body[..complete], rename, strip),
                "complete events come out at once"
            );
        }
        out.extend_from_slice(&shaper.finish());
        out
    }

    /// The numbers of the chunks in `out`, in order, and how many usage chunks and
    /// comments it holds.
    fn census(out: &[u8]) -> (Vec<u64>, usize, usize) {
        let text = String::from_utf8_lossy(out);
        let mut numbers = Vec::new();
        let mut usage = 0;
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let value: Value = serde_json::from_str(data).unwrap_or_default();
            match value.get("n").and_then(Value::as_u64) {
                Some(n) => numbers.push(n),
                None => usage += 1,
            }
        }
        (numbers, usage, text.matches(": keep-alive").count())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn any_cutting_shapes_alike_and_keeps_every_event_once(
            events in events(),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
            rename in any::<bool>(),
            strip in any::<bool>(),
            unfinished in any::<bool>(),
        ) {
            let mut body: Vec<u8> = Vec::new();
            let mut ends = Vec::new();
            for event in &events {
                body.extend_from_slice(&event.bytes);
                ends.push(body.len());
            }
            if unfinished {
                // A last event the upstream never ended: handed over by `finish`.
                body.extend_from_slice(b"data: {\"model\":\"real\",\"n\":99}");
            }
            let whole = shape_whole(&body, rename, strip);
            prop_assert_eq!(&shape_cut(&body, &ends, &cuts, rename, strip), &whole);

            let (numbers, usage, comments) = census(&whole);
            let mut expected: Vec<u64> = events
                .iter()
                .enumerate()
                .filter(|(_, e)| e.kind == Kind::Chunk)
                .map(|(n, _)| n as u64)
                .collect();
            if unfinished {
                expected.push(99);
            }
            prop_assert_eq!(numbers, expected);
            let usage_sent = events.iter().filter(|e| e.kind == Kind::Usage).count();
            prop_assert_eq!(usage, if strip { 0 } else { usage_sent });
            prop_assert_eq!(comments, events.iter().filter(|e| e.kind == Kind::Comment).count());
            let names_real = String::from_utf8_lossy(&whole).contains("\"real\"");
            if rename {
                prop_assert!(!names_real, "every model name is put back");
            } else {
                prop_assert_eq!(names_real, names_a_model(&events, unfinished, strip));
            }
            if !rename && !strip {
                prop_assert_eq!(whole, body, "nothing to shape: bytes pass unchanged");
            }
        }
    }

    /// Whether any event left in the output names a model.
    fn names_a_model(events: &[Event], unfinished: bool, strip: bool) -> bool {
        unfinished
            || events
                .iter()
                .any(|e| e.kind == Kind::Chunk || (e.kind == Kind::Usage && !strip))
    }
}
