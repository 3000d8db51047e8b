//! JetStream's answer to a publish (the PubAck), read with as little work as possible.
//!
//! The publisher receives one answer per message, so the common case, a small flat object
//! such as `{"stream":"CDC","seq":42}` or `{"stream":"CDC","seq":42,"duplicate":true}`, is read
//! by a single pass over the bytes without allocating. Refusals look like
//! `{"error":{"code":503,"err_code":10077,"description":"..."}}`; only their description is
//! unescaped into a `String`. Members this module does not know (`domain`, `val`, `batch`, ...)
//! are skipped, so newer servers keep working. A reply carrying a NATS status instead of a
//! PubAck (`503` no responders: no stream holds the subject, or JetStream is not ready) has an
//! empty payload and is told apart by [`read_reply`].

use async_nats::{Message, StatusCode};

/// A message JetStream stored, or recognised as already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubAck {
    /// The message's sequence in the stream (for a duplicate: the first copy's).
    pub sequence: u64,
    /// True when the message id was seen within the duplicate window and nothing was stored.
    pub duplicate: bool,
}

/// Why a reply to a publish does not acknowledge it. Every variant means the message may not
/// be stored: the publisher sends it again with the same message id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PubAckError {
    /// JetStream answered with an API error.
    #[error("JetStream refused the message: {description} (status {code}, error code {err_code})")]
    Refused {
        /// HTTP-like status, e.g. 503.
        code: u64,
        /// JetStream's error code, e.g. 10077.
        err_code: u64,
        /// JetStream's explanation.
        description: String,
    },
    /// Nobody answered on the subject: no stream holds it, or JetStream is not running (yet).
    #[error("no JetStream stream answered (503 no responders): check that a stream holds the change subjects and that JetStream is running")]
    NoResponders,
    /// The server answered with another status instead of a PubAck.
    #[error("the server answered with status {code}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Status {
        /// The status code.
        code: u16,
        /// The status line's text, if any.
        description: Option<String>,
    },
    /// The reply is neither a PubAck nor a JetStream error.
    #[error("unreadable PubAck ({reason}): {excerpt:?}")]
    Malformed {
        /// What is wrong with it.
        reason: &'static str,
        /// The start of the reply, for the log.
        excerpt: String,
    },
}

/// JetStream's error code for a message whose `Nats-Expected-Last-Msg-Id` is not the id of the
/// stream's last message.
pub const ERR_WRONG_LAST_MSG_ID: u64 = 10070;

/// JetStream's error code for a message larger than the stream's `max_msg_size`.
pub const ERR_MESSAGE_TOO_LARGE: u64 = 10054;

/// JetStream's error code for a batch message sent to a stream that does not allow batches
/// (`allow_batched` off).
pub const ERR_BATCH_DISABLED: u64 = 10205;
/// ... whose batch reply subject the server cannot read.
pub const ERR_BATCH_INVALID_PATTERN: u64 = 10206;
/// ... whose batch id the server refuses.
pub const ERR_BATCH_INVALID_ID: u64 = 10207;
/// ... whose batch the server does not know: never started, or dropped after getting no
/// message for its batch timeout.
pub const ERR_BATCH_UNKNOWN_ID: u64 = 10208;

impl PubAckError {
    /// True when the stream takes no fast-ingest batches from this publisher at all (they are
    /// not allowed, or not understood): sending more would fail the same way.
    pub fn refuses_batches(&self) -> bool {
        matches!(self, PubAckError::Refused { err_code, .. }
            if matches!(*err_code, ERR_BATCH_DISABLED | ERR_BATCH_INVALID_PATTERN | ERR_BATCH_INVALID_ID))
    }

    /// True when the server no longer knows the message's fast-ingest batch: none of the
    /// batch's messages not yet acknowledged will be.
    pub fn is_unknown_batch(&self) -> bool {
        matches!(self, PubAckError::Refused { err_code, .. } if *err_code == ERR_BATCH_UNKNOWN_ID)
    }

    /// True when no resend can get the message stored (it is larger than the stream takes).
    pub fn is_permanent(&self) -> bool {
        matches!(self, PubAckError::Refused { err_code, .. } if *err_code == ERR_MESSAGE_TOO_LARGE)
    }

    /// True when JetStream refused the message because the stream's last message is not the
    /// one it expects (`Nats-Expected-Last-Msg-Id`).
    pub fn is_wrong_last_msg_id(&self) -> bool {
        matches!(self, PubAckError::Refused { err_code, .. } if *err_code == ERR_WRONG_LAST_MSG_ID)
    }
}

/// Longest part of a malformed reply quoted in the error.
const EXCERPT: usize = 120;
/// Deepest nesting skipped inside an unknown member before the reply is called malformed.
const MAX_DEPTH: usize = 32;

/// Reads a reply to a publish: a PubAck, a JetStream error, or a status message without one.
pub fn read_reply(message: &Message) -> Result<PubAck, PubAckError> {
    if let Some(status) = message.status {
        if status == StatusCode::NO_RESPONDERS {
            return Err(PubAckError::NoResponders);
        }
        // A status with a body is unheard of for PubAcks; the status tells more than a
        // parse failure would.
        return Err(PubAckError::Status {
            code: status.as_u16(),
            description: message.description.clone(),
        });
    }
    parse(&message.payload)
}

/// Parses a PubAck payload.
pub fn parse(payload: &[u8]) -> Result<PubAck, PubAckError> {
    let mut r = Reader {
        bytes: payload,
        at: 0,
    };
    r.parse_ack().map_err(|reason| PubAckError::Malformed {
        reason,
        excerpt: String::from_utf8_lossy(&payload[..payload.len().min(EXCERPT)]).into_owned(),
    })?
}

/// The fields of the `error` member.
#[derive(Default)]
struct ApiError {
    code: u64,
    err_code: u64,
    description: String,
}

/// A cursor over the reply. Every method returns the reason as `Err` when the input is not
/// what JSON (or a PubAck) allows there.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

type Step<T> = Result<T, &'static str>;

impl<'a> Reader<'a> {
    /// The outer result is the syntax; the inner one the meaning (ack or refusal).
    fn parse_ack(&mut self) -> Step<Result<PubAck, PubAckError>> {
        let mut stream = false;
        let mut sequence = None;
        let mut duplicate = false;
        let mut error = None;
        self.expect(b'{', "not a JSON object")?;
        if !self.eat(b'}') {
            loop {
                let key = self.key()?;
                match key {
                    b"stream" => {
                        self.string()?;
                        stream = true;
                    }
                    b"seq" => sequence = Some(self.unsigned()?),
                    b"duplicate" => duplicate = self.boolean()?,
                    b"error" => error = Some(self.api_error()?),
                    _ => self.skip_value(0)?,
                }
                if !self.next_member()? {
                    break;
                }
            }
        }
        self.skip_ws();
        if self.at != self.bytes.len() {
            return Err("trailing characters after the object");
        }
        if let Some(e) = error {
            return Ok(Err(PubAckError::Refused {
                code: e.code,
                err_code: e.err_code,
                description: e.description,
            }));
        }
        match (stream, sequence) {
            (true, Some(sequence)) => Ok(Ok(PubAck {
                sequence,
                duplicate,
            })),
            (false, _) => Err("no stream"),
            (true, None) => Err("no sequence"),
        }
    }

    fn api_error(&mut self) -> Step<ApiError> {
        let mut e = ApiError::default();
        self.expect(b'{', "error is not an object")?;
        if self.eat(b'}') {
            return Ok(e);
        }
        loop {
            match self.key()? {
                b"code" => e.code = self.unsigned()?,
                b"err_code" => e.err_code = self.unsigned()?,
                b"description" => {
                    let raw = self.string()?;
                    // Rare (refusals only), so the full JSON unescaping is affordable here.
                    e.description =
                        serde_json::from_slice(raw).map_err(|_| "invalid error description")?;
                }
                _ => self.skip_value(1)?,
            }
            if !self.next_member()? {
                return Ok(e);
            }
        }
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8, reason: &'static str) -> Step<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(reason)
        }
    }

    /// After a member: true if another follows (`,`), false at the end of the object (`}`).
    fn next_member(&mut self) -> Step<bool> {
        match self.peek() {
            Some(b',') => {
                self.at += 1;
                Ok(true)
            }
            Some(b'}') => {
                self.at += 1;
                Ok(false)
            }
            _ => Err("expected ',' or '}'"),
        }
    }

    /// A member's name and its colon. Names are compared as written: the ones of interest
    /// contain no escapes, and an escaped one is simply an unknown member.
    fn key(&mut self) -> Step<&'a [u8]> {
        let raw = self.string()?;
        self.expect(b':', "expected ':'")?;
        Ok(&raw[1..raw.len() - 1])
    }

    /// A string, returned raw with its quotes and escapes.
    fn string(&mut self) -> Step<&'a [u8]> {
        if self.peek() != Some(b'"') {
            return Err("expected a string");
        }
        let start = self.at;
        self.at += 1;
        loop {
            match self.bytes.get(self.at) {
                None => return Err("unterminated string"),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(&self.bytes[start..self.at]);
                }
                Some(b'\\') => {
                    if self.at + 1 >= self.bytes.len() {
                        return Err("unterminated string");
                    }
                    self.at += 2;
                }
                Some(c) if *c < 0x20 => return Err("control character in a string"),
                Some(_) => self.at += 1,
            }
        }
    }

    /// A non-negative integer that fits in 64 bits.
    fn unsigned(&mut self) -> Step<u64> {
        self.skip_ws();
        let start = self.at;
        let mut n: u64 = 0;
        while let Some(&c @ b'0'..=b'9') = self.bytes.get(self.at) {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(c - b'0')))
                .ok_or("number too large")?;
            self.at += 1;
        }
        if self.at == start {
            return Err("expected an unsigned integer");
        }
        if self.at - start > 1 && self.bytes[start] == b'0' {
            return Err("leading zero in a number");
        }
        if let Some(b'.' | b'e' | b'E') = self.bytes.get(self.at) {
            return Err("expected an integer");
        }
        Ok(n)
    }

    fn boolean(&mut self) -> Step<bool> {
        self.skip_ws();
        let rest = &self.bytes[self.at..];
        if rest.starts_with(b"true") {
            self.at += 4;
            Ok(true)
        } else if rest.starts_with(b"false") {
            self.at += 5;
            Ok(false)
        } else {
            Err("expected true or false")
        }
    }

    /// Skips any JSON value, checking its syntax only as far as finding its end needs.
    fn skip_value(&mut self, depth: usize) -> Step<()> {
        if depth > MAX_DEPTH {
            return Err("nested too deeply");
        }
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b'{') => {
                self.at += 1;
                if self.eat(b'}') {
                    return Ok(());
                }
                loop {
                    self.key()?;
                    self.skip_value(depth + 1)?;
                    if !self.next_member()? {
                        return Ok(());
                    }
                }
            }
            Some(b'[') => {
                self.at += 1;
                if self.eat(b']') {
                    return Ok(());
                }
                loop {
                    self.skip_value(depth + 1)?;
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return Ok(());
                        }
                        _ => return Err("expected ',' or ']'"),
                    }
                }
            }
            Some(b't' | b'f') => self.boolean().map(drop),
            Some(b'n') if self.bytes[self.at..].starts_with(b"null") => {
                self.at += 4;
                Ok(())
            }
            Some(b'-' | b'0'..=b'9') => {
                let start = self.at;
                while let Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') =
                    self.bytes.get(self.at)
                {
                    self.at += 1;
                }
                // Validated loosely: the value is ignored, only its end matters.
                if self.bytes[start..self.at].iter().any(u8::is_ascii_digit) {
                    Ok(())
                } else {
                    Err("invalid number")
                }
            }
            _ => Err("expected a value"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ok(sequence: u64, duplicate: bool) -> Result<PubAck, PubAckError> {
        Ok(PubAck {
            sequence,
            duplicate,
        })
    }

    fn malformed(payload: &str) -> &'static str {
        match parse(payload.as_bytes()) {
            Err(PubAckError::Malformed { reason, .. }) => reason,
            other => panic!("{payload:?} was read as {other:?}"),
        }
    }

    #[test]
    fn acks() {
        assert_eq!(parse(br#"{"stream":"CDC","seq":1}"#), ok(1, false));
        assert_eq!(
            parse(br#"{"stream":"CDC","seq":18446744073709551615,"duplicate":true}"#),
            ok(u64::MAX, true)
        );
        assert_eq!(
            parse(br#"{"stream":"CDC","seq":7,"duplicate":false}"#),
            ok(7, false)
        );
        assert_eq!(
            parse(b" {\n \"seq\" : 0 ,\t\"stream\" : \"C\\\"D\" } \r\n"),
            ok(0, false)
        );
    }

    #[test]
    fn unknown_members_are_skipped() {
        assert_eq!(
            parse(
                br#"{"stream":"CDC","domain":"hub","seq":3,"val":"12","batch":{"id":"b","n":[1,2.5e3,-4,{"x":null}]},"ok":true,"none":null,"empty":{},"list":[]}"#
            ),
            ok(3, false)
        );
        // An escaped name is just another unknown member.
        assert_eq!(
            parse(br#"{"stream":"CDC","se\u0071":9,"seq":4}"#),
            ok(4, false)
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(
            parse(
                br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#
            ),
            Err(PubAckError::Refused {
                code: 503,
                err_code: 10077,
                description: "maximum messages exceeded".into()
            })
        );
        // Escapes in the description are decoded; other members do not matter.
        let e = parse(
            br#"{"stream":"CDC","error":{"description":"wrong \"last\" seq\u00e9","code":400,"err_code":10071,"extra":[1]},"seq":5}"#,
        )
        .unwrap_err();
        assert_eq!(
            e,
            PubAckError::Refused {
                code: 400,
                err_code: 10071,
                description: "wrong \"last\" seqé".into()
            }
        );
        assert!(e
            .to_string()
            .contains("wrong \"last\" seqé (status 400, error code 10071)"));
        assert_eq!(
            parse(br#"{"error":{}}"#),
            Err(PubAckError::Refused {
                code: 0,
                err_code: 0,
                description: String::new()
            })
        );
    }

    #[test]
    fn malformed_acks() {
        let cases = [
            ("", "not a JSON object"),
            ("   ", "not a JSON object"),
            ("+OK", "not a JSON object"),
            ("[]", "not a JSON object"),
            ("{}", "no stream"),
            (r#"{"stream":"CDC"}"#, "no sequence"),
            (r#"{"seq":1}"#, "no stream"),
            (r#"{"stream":"CDC","seq":1"#, "expected ',' or '}'"),
            (
                r#"{"stream":"CDC","seq":1}}"#,
                "trailing characters after the object",
            ),
            (
                r#"{"stream":"CDC","seq":-1}"#,
                "expected an unsigned integer",
            ),
            (r#"{"stream":"CDC","seq":1.5}"#, "expected an integer"),
            (r#"{"stream":"CDC","seq":1e3}"#, "expected an integer"),
            (r#"{"stream":"CDC","seq":01}"#, "leading zero in a number"),
            (
                r#"{"stream":"CDC","seq":"1"}"#,
                "expected an unsigned integer",
            ),
            (
                r#"{"stream":"CDC","seq":18446744073709551616}"#,
                "number too large",
            ),
            (r#"{"stream":5,"seq":1}"#, "expected a string"),
            (r#"{"stream":"CDC,"seq":1}"#, "expected ',' or '}'"),
            (r#"{"stream" "CDC","seq":1}"#, "expected ':'"),
            (r#"{"stream":"CDC"#, "unterminated string"),
            ("{\"stream\":\"C\\", "unterminated string"),
            (
                "{\"stream\":\"C\nD\",\"seq\":1}",
                "control character in a string",
            ),
            (
                r#"{"stream":"CDC","seq":1,"duplicate":1}"#,
                "expected true or false",
            ),
            (r#"{"stream":"CDC","seq":1,}"#, "expected a string"),
            (r#"{stream:"CDC","seq":1}"#, "expected a string"),
            (r#"{"stream":"CDC","seq":1,"x":nul}"#, "expected a value"),
            (
                r#"{"stream":"CDC","seq":1,"x":[1 2]}"#,
                "expected ',' or ']'",
            ),
            (r#"{"stream":"CDC","seq":1,"x":-}"#, "invalid number"),
            (r#"{"error":"bad"}"#, "error is not an object"),
            (r#"{"error":{"code":"x"}}"#, "expected an unsigned integer"),
            (
                r#"{"error":{"description":"bad \x escape"}}"#,
                "invalid error description",
            ),
        ];
        for (payload, reason) in cases {
            assert_eq!(malformed(payload), reason, "{payload}");
        }
        let deep = format!(
            r#"{{"stream":"CDC","seq":1,"x":{}{}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert_eq!(malformed(&deep), "nested too deeply");
        // Invalid UTF-8 is quoted lossily and cut short.
        let long = [b"\xff".as_slice(), &[b'x'; 500]].concat();
        match parse(&long) {
            Err(e @ PubAckError::Malformed { .. }) => {
                let text = e.to_string();
                assert!(text.starts_with("unreadable PubAck (not a JSON object): \"\u{fffd}xxx"));
                assert!(text.len() < 200, "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    fn reply(
        payload: &'static [u8],
        status: Option<StatusCode>,
        description: Option<&str>,
    ) -> Message {
        Message {
            subject: "_INBOX.x.1".into(),
            reply: None,
            payload: Bytes::from_static(payload),
            headers: status.map(|_| async_nats::HeaderMap::new()),
            status,
            description: description.map(str::to_owned),
            length: payload.len(),
        }
    }

    #[test]
    fn status_replies() {
        assert_eq!(
            read_reply(&reply(b"", Some(StatusCode::NO_RESPONDERS), None)),
            Err(PubAckError::NoResponders)
        );
        let e = read_reply(&reply(
            b"",
            Some(StatusCode::TIMEOUT),
            Some("Request Timeout"),
        ))
        .unwrap_err();
        assert_eq!(
            e,
            PubAckError::Status {
                code: 408,
                description: Some("Request Timeout".into())
            }
        );
        assert_eq!(
            e.to_string(),
            "the server answered with status 408 (Request Timeout)"
        );
        assert_eq!(
            read_reply(&reply(
                br#"{"stream":"CDC","seq":2,"duplicate":true}"#,
                None,
                None
            )),
            ok(2, true)
        );
        assert!(matches!(
            read_reply(&reply(b"", None, None)),
            Err(PubAckError::Malformed { .. })
        ));
    }
}
