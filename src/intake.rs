//! Intake: raw message bytes to a validated [`Ticket`], or the reason it is a dead letter.
//!
//! Checks run cheapest first: size before anything is parsed, then UTF-8, then JSON
//! syntax, then the ticket schema. Parsing never recurses deeper than serde_json's
//! limit (128), so hostile nesting costs microseconds and no stack.

use serde::Deserialize;
use serde_json::value::RawValue;
use xxhash_rust::xxh3::Xxh3;

use crate::ticket::{ErrorKind, Message, Ticket};

/// Limits from SPEC §3.1.
pub const MAX_TICKET_ID_CHARS: usize = 128;
pub const MAX_MESSAGES: usize = 200;
pub const MAX_TEXT_BYTES: usize = 32 * 1024;

/// Why a message was rejected: the dead letter's `error`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct Rejection {
    pub kind: ErrorKind,
    pub message: String,
    /// Present when the ticket id could be read despite the rejection.
    pub ticket_id: Option<String>,
}

impl Rejection {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Rejection { kind, message: message.into(), ticket_id: None }
    }
}

#[derive(Deserialize)]
struct WireTicket {
    ticket_id: String,
    messages: Vec<Message>,
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    customer_id: Option<String>,
    #[serde(default)]
    customer_tier: Option<String>,
    #[serde(default)]
    locale: Option<String>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    metadata: Option<Box<RawValue>>,
    #[serde(default)]
    created_at: Option<String>,
}

/// The ordering key of a raw ticket: its `conversation_id`, or its `ticket_id` when
/// it has none (SPEC §3.1). `None` for anything that is not a JSON object with a
/// string id: such input orders with nothing and becomes a dead letter on its own.
/// Reads only the two ids (everything else is skipped unparsed), for sources whose
/// messages carry no key of their own.
pub fn conversation_key(raw: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Ids<'a> {
        #[serde(borrow, default)]
        ticket_id: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow, default)]
        conversation_id: Option<std::borrow::Cow<'a, str>>,
    }
    let raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
    let ids: Ids<'_> = serde_json::from_slice(raw).ok()?;
    ids.conversation_id.or(ids.ticket_id).map(std::borrow::Cow::into_owned)
}

/// Parses and validates one raw message. `max_message_bytes` is `limits.max_message_bytes`.
pub fn parse(raw: &[u8], max_message_bytes: usize) -> Result<Ticket, Rejection> {
    if raw.len() > max_message_bytes {
        return Err(Rejection::new(
            ErrorKind::TooLarge,
            format!("message is {} bytes, limit is {max_message_bytes}", raw.len()),
        ));
    }
    let raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
    let text = std::str::from_utf8(raw).map_err(|e| {
        Rejection::new(
            ErrorKind::InvalidEncoding,
            format!("not valid UTF-8: invalid byte at offset {}", e.valid_up_to()),
        )
    })?;
    // serde would read a struct from an array too; the contract wants an object.
    if !text.trim_start().starts_with('{') {
        return Err(not_an_object(text));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let wire: WireTicket = match serde_path_to_error::deserialize(&mut de) {
        Ok(wire) => wire,
        Err(err) => return Err(classify_parse_error(text, err)),
    };
    de.end()
        .map_err(|e| Rejection::new(ErrorKind::InvalidJson, format!("trailing characters after the ticket: {e}")))?;
    if contains_lone_surrogate_escape(text) {
        return Err(Rejection::new(
            ErrorKind::InvalidJson,
            "lone surrogate in a \\u escape (not a valid Unicode character)",
        ));
    }
    validate(wire).map_err(|(ticket_id, message)| Rejection { kind: ErrorKind::InvalidTicket, message, ticket_id })
}

/// Splits serde errors into syntax (`invalid_json`) and shape (`invalid_ticket`),
/// naming the offending field for the latter.
fn classify_parse_error(text: &str, err: serde_path_to_error::Error<serde_json::Error>) -> Rejection {
    let path = err.path().to_string();
    let inner = err.into_inner();
    match inner.classify() {
        serde_json::error::Category::Data => {
            // Wrong shape: a field of the wrong type, a missing or duplicated field,
            // or a document that is not an object at all.
            let message =
                if path.is_empty() || path == "." { format!("ticket: {inner}") } else { format!("{path}: {inner}") };
            let mut rejection = Rejection::new(ErrorKind::InvalidTicket, message);
            rejection.ticket_id = sniff_ticket_id(text);
            rejection
        }
        _ => Rejection::new(ErrorKind::InvalidJson, inner.to_string()),
    }
}

/// Valid JSON of the wrong shape is `invalid_ticket`; anything else `invalid_json`.
fn not_an_object(text: &str) -> Rejection {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => {
            let found = match v {
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Null => "null",
                serde_json::Value::Object(_) => "an object",
            };
            Rejection::new(ErrorKind::InvalidTicket, format!("ticket: must be a JSON object, found {found}"))
        }
        Err(e) => Rejection::new(ErrorKind::InvalidJson, e.to_string()),
    }
}

/// Best-effort read of `ticket_id` from a document that failed schema validation,
/// so the dead letter can name the ticket.
fn sniff_ticket_id(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        ticket_id: String,
    }
    serde_json::from_str::<IdOnly>(text)
        .ok()
        .map(|t| t.ticket_id)
        .filter(|id| !id.trim().is_empty() && id.chars().count() <= MAX_TICKET_ID_CHARS)
}

fn validate(wire: WireTicket) -> Result<Ticket, (Option<String>, String)> {
    let id_chars = wire.ticket_id.chars().count();
    if wire.ticket_id.trim().is_empty() {
        return Err((None, "ticket_id: must not be empty or blank".into()));
    }
    if id_chars > MAX_TICKET_ID_CHARS {
        return Err((None, format!("ticket_id: {id_chars} characters, at most {MAX_TICKET_ID_CHARS}")));
    }
    let id = Some(wire.ticket_id.clone());
    if wire.messages.is_empty() {
        return Err((id, "messages: must hold at least one message".into()));
    }
    if wire.messages.len() > MAX_MESSAGES {
        return Err((id, format!("messages: {} items, at most {MAX_MESSAGES}", wire.messages.len())));
    }
    for (i, m) in wire.messages.iter().enumerate() {
        if m.text.trim().is_empty() {
            return Err((id, format!("messages[{i}].text: must not be blank")));
        }
        if m.text.len() > MAX_TEXT_BYTES {
            return Err((id, format!("messages[{i}].text: {} bytes, at most {MAX_TEXT_BYTES}", m.text.len())));
        }
    }
    if let Some(meta) = &wire.metadata {
        if !meta.get().starts_with('{') {
            return Err((id, "metadata: must be a JSON object".into()));
        }
    }
    let unit_id = unit_id(&wire.ticket_id, &wire.messages);
    let conversation_id = wire.conversation_id.filter(|c| !c.is_empty()).unwrap_or_else(|| wire.ticket_id.clone());
    Ok(Ticket {
        ticket_id: wire.ticket_id,
        unit_id,
        conversation_id,
        customer_id: wire.customer_id,
        customer_tier: wire.customer_tier,
        locale: wire.locale,
        channel: wire.channel,
        subject: wire.subject,
        messages: wire.messages,
        metadata: wire.metadata,
        created_at: wire.created_at,
    })
}

/// The idempotency key: `ticket_id:` plus 8 hex digits of a stable hash over the
/// roles and texts of the messages. Timestamps are left out on purpose: a helpdesk
/// that re-sends the same conversation with reformatted times is not a new turn.
pub fn unit_id(ticket_id: &str, messages: &[Message]) -> String {
    let mut h = Xxh3::new();
    for m in messages {
        let role: u8 = match m.role {
            crate::ticket::Role::Customer => 1,
            crate::ticket::Role::Agent => 2,
            crate::ticket::Role::System => 3,
        };
        h.update(&[role]);
        h.update(&(m.text.len() as u64).to_le_bytes());
        h.update(m.text.as_bytes());
    }
    format!("{ticket_id}:{:08x}", (h.digest() >> 32) as u32)
}

/// serde_json accepts a lone surrogate escape in strings it skips or keeps raw
/// (unknown fields, `metadata`), which would echo invalid Unicode downstream. The
/// SPEC makes every lone surrogate `invalid_json`, so scan the (rare) escapes.
fn contains_lone_surrogate_escape(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = memchr_backslash(&b[i..]) {
        let at = i + pos;
        // Count the run of backslashes: an even run is escaped backslashes.
        let mut run = 0;
        while at + run < b.len() && b[at + run] == b'\\' {
            run += 1;
        }
        let next = at + run;
        if run % 2 == 1 && next < b.len() && b[next] == b'u' {
            if let Some(unit) = hex4(b, next + 1) {
                if (0xD800..0xDC00).contains(&unit) {
                    let low = if b.get(next + 5) == Some(&b'\\') && b.get(next + 6) == Some(&b'u') {
                        hex4(b, next + 7)
                    } else {
                        None
                    };
                    match low {
                        Some(l) if (0xDC00..0xE000).contains(&l) => {
                            i = next + 11;
                            continue;
                        }
                        _ => return true,
                    }
                } else if (0xDC00..0xE000).contains(&unit) {
                    return true;
                }
            }
        }
        i = next.max(at + 1);
    }
    false
}

fn memchr_backslash(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\\')
}

fn hex4(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    let s = std::str::from_utf8(s).ok()?;
    u32::from_str_radix(s, 16).ok()
}

/// [`parse`] for bytes that may have been cut short: `full_len` is the real length
/// of a message kept only in part (see [`read_line`]), which is then `too_large`
/// with its real size named.
pub fn parse_cut(raw: &[u8], full_len: Option<u64>, max_message_bytes: usize) -> Result<Ticket, Rejection> {
    match full_len {
        Some(full) if full > max_message_bytes as u64 => {
            Err(Rejection::new(ErrorKind::TooLarge, format!("message is {full} bytes, limit is {max_message_bytes}")))
        }
        _ => parse(raw, max_message_bytes),
    }
}

/// A JSONL input: the file at `path`, or standard input for `-`, buffered, with its
/// length in bytes when it is a file.
pub async fn open_jsonl(
    path: &std::path::Path,
) -> std::io::Result<(Box<dyn tokio::io::AsyncBufRead + Unpin + Send>, Option<u64>)> {
    const BUFFER: usize = 1 << 16;
    if path == std::path::Path::new("-") {
        return Ok((Box::new(tokio::io::BufReader::with_capacity(BUFFER, tokio::io::stdin())), None));
    }
    let file = tokio::fs::File::open(path).await?;
    let len = file.metadata().await.ok().map(|m| m.len());
    Ok((Box::new(tokio::io::BufReader::with_capacity(BUFFER, file)), len))
}

/// What [`read_line`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineRead {
    /// The line's length without its line ending: more than the kept bytes when it
    /// was cut at the limit.
    pub full_len: u64,
    /// Bytes taken from the input, line ending included.
    pub consumed: u64,
}

impl LineRead {
    /// Whether the line was longer than what was kept.
    pub fn cut(&self, kept: &[u8]) -> bool {
        self.full_len as usize > kept.len()
    }

    /// The real length of a line that was cut, for [`parse_cut`].
    pub fn full_len_if_cut(&self, kept: &[u8]) -> Option<u64> {
        self.cut(kept).then_some(self.full_len)
    }
}

/// Reads the next line of a JSONL stream into `line` (cleared first), without its
/// line ending (`\n` or `\r\n`). A line longer than `limit` bytes is never held
/// whole: only its first `limit + 1` bytes are kept, enough for [`parse`] to call
/// it `too_large`, and `full_len` tells its real length. `None` at the end of input.
pub async fn read_line<R: tokio::io::AsyncBufRead + Unpin + ?Sized>(
    reader: &mut R,
    limit: usize,
    line: &mut Vec<u8>,
) -> std::io::Result<Option<LineRead>> {
    use tokio::io::AsyncBufReadExt;
    line.clear();
    let (mut full_len, mut consumed, mut saw_any) = (0u64, 0u64, false);
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            break;
        }
        saw_any = true;
        let (chunk, used, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        full_len += chunk.len() as u64;
        let room = (limit + 1).saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(used);
        consumed += used as u64;
        if done {
            break;
        }
    }
    if !saw_any {
        return Ok(None);
    }
    if line.last() == Some(&b'\r') && full_len as usize == line.len() {
        line.pop();
        full_len -= 1;
    }
    Ok(Some(LineRead { full_len, consumed }))
}

/// Whether a line read by [`read_line`] is blank (skipped by every JSONL reader).
pub fn is_blank(line: &[u8], read: &LineRead) -> bool {
    !read.cut(line) && line.iter().all(u8::is_ascii_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 256 * 1024;

    fn kind(raw: &[u8]) -> ErrorKind {
        parse(raw, LIMIT).expect_err("should be rejected").kind
    }

    #[test]
    fn minimal_ticket_parses_with_defaults() {
        let t = parse(br#"{"ticket_id":"T-1","messages":[{"role":"customer","text":"hi"}]}"#, LIMIT).unwrap();
        assert_eq!(t.conversation_id, "T-1");
        assert!(t.unit_id.starts_with("T-1:"));
        assert_eq!(t.unit_id.len(), "T-1:".len() + 8);
        assert!(t.metadata.is_none());
    }

    #[test]
    fn explicit_nulls_are_absent() {
        let t = parse(
            br#"{"ticket_id":"T-1","conversation_id":null,"metadata":null,"locale":null,"messages":[{"role":"customer","text":"hi","sent_at":null}]}"#,
            LIMIT,
        )
        .unwrap();
        assert_eq!(t.conversation_id, "T-1");
        assert!(t.metadata.is_none());
    }

    #[test]
    fn metadata_is_kept_as_exact_text() {
        let raw = br#"{"ticket_id":"T-1","messages":[{"role":"customer","text":"hi"}],"metadata":{"n":123456789012345678901234567890,"z":"\u0000","f":1.10}}"#;
        let t = parse(raw, LIMIT).unwrap();
        assert_eq!(t.metadata.unwrap().get(), r#"{"n":123456789012345678901234567890,"z":"\u0000","f":1.10}"#);
    }

    #[test]
    fn unit_id_changes_with_a_new_turn_only() {
        let a = parse(br#"{"ticket_id":"T","messages":[{"role":"customer","text":"a"}]}"#, LIMIT).unwrap();
        let same = parse(
            br#"{"ticket_id":"T","subject":"x","messages":[{"role":"customer","text":"a","sent_at":"2026-01-01T00:00:00Z"}]}"#,
            LIMIT,
        )
        .unwrap();
        let next = parse(
            br#"{"ticket_id":"T","messages":[{"role":"customer","text":"a"},{"role":"customer","text":"b"}]}"#,
            LIMIT,
        )
        .unwrap();
        assert_eq!(a.unit_id, same.unit_id);
        assert_ne!(a.unit_id, next.unit_id);
    }

    #[test]
    fn size_is_checked_before_parsing_and_the_limit_itself_passes() {
        let base = br#"{"ticket_id":"T","messages":[{"role":"customer","text":"a"}]}"#;
        assert!(parse(base, base.len()).is_ok());
        assert_eq!(parse(base, base.len() - 1).unwrap_err().kind, ErrorKind::TooLarge);
        assert_eq!(parse(b"garbage", 3).unwrap_err().kind, ErrorKind::TooLarge);
    }

    #[test]
    fn bom_is_stripped() {
        let mut raw = b"\xEF\xBB\xBF".to_vec();
        raw.extend_from_slice(br#"{"ticket_id":"T","messages":[{"role":"customer","text":"a"}]}"#);
        assert!(parse(&raw, LIMIT).is_ok());
    }

    #[test]
    fn encoding_and_syntax_errors() {
        assert_eq!(kind(b"{\"ticket_id\":\"\xff\"}"), ErrorKind::InvalidEncoding);
        assert_eq!(kind(b"{"), ErrorKind::InvalidJson);
        assert_eq!(kind(b"{\"ticket_id\":\"T\",}"), ErrorKind::InvalidJson);
        assert_eq!(
            kind(br#"{"ticket_id":"T","messages":[{"role":"customer","text":"a"}]} {}"#),
            ErrorKind::InvalidJson
        );
        assert_eq!(kind(b"[1,"), ErrorKind::InvalidJson);
        assert_eq!(kind(b""), ErrorKind::InvalidJson);
        assert_eq!(kind(b"\0"), ErrorKind::InvalidJson);
        let deep = format!(r#"{{"ticket_id":"T","messages":{}{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(kind(deep.as_bytes()), ErrorKind::InvalidJson);
    }

    #[test]
    fn lone_surrogates_are_invalid_json_anywhere() {
        let in_text = br#"{"ticket_id":"T","messages":[{"role":"customer","text":"\ud800"}]}"#;
        let in_meta = br#"{"ticket_id":"T","messages":[{"role":"customer","text":"a"}],"metadata":{"k":"\udc00"}}"#;
        let in_unknown = br#"{"ticket_id":"T","x":"\ud83d","messages":[{"role":"customer","text":"a"}]}"#;
        for raw in [&in_text[..], in_meta, in_unknown] {
            assert_eq!(kind(raw), ErrorKind::InvalidJson, "{}", String::from_utf8_lossy(raw));
        }
        let pair = br#"{"ticket_id":"T","messages":[{"role":"customer","text":"\ud83d\ude00 \\ud800"}]}"#;
        assert!(parse(pair, LIMIT).is_ok());
    }

    #[test]
    fn schema_errors_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (br#"[1,2]"#, "ticket"),
            (br#""T""#, "ticket"),
            (br#"{"messages":[{"role":"customer","text":"a"}]}"#, "ticket_id"),
            (br#"{"ticket_id":5,"messages":[{"role":"customer","text":"a"}]}"#, "ticket_id"),
            (br#"{"ticket_id":"","messages":[{"role":"customer","text":"a"}]}"#, "ticket_id"),
            (br#"{"ticket_id":"T","messages":[]}"#, "messages"),
            (br#"{"ticket_id":"T","messages":[{"role":"Customer","text":"a"}]}"#, "messages[0].role"),
            (br#"{"ticket_id":"T","messages":[{"role":"customer","text":"  "}]}"#, "messages[0].text"),
            (br#"{"ticket_id":"T","messages":[{"role":"customer","text":"a"}],"metadata":[1]}"#, "metadata"),
            (br#"{"ticket_id":"T","ticket_id":"U","messages":[{"role":"customer","text":"a"}]}"#, "ticket_id"),
        ];
        for (raw, field) in cases {
            let r = parse(raw, LIMIT).unwrap_err();
            assert_eq!(r.kind, ErrorKind::InvalidTicket, "{}", String::from_utf8_lossy(raw));
            assert!(r.message.contains(field), "{} -> {}", String::from_utf8_lossy(raw), r.message);
        }
    }

    #[test]
    fn rejected_ticket_keeps_its_id_when_readable() {
        let r = parse(br#"{"ticket_id":"T-9","messages":[]}"#, LIMIT).unwrap_err();
        assert_eq!(r.ticket_id.as_deref(), Some("T-9"));
    }
}
