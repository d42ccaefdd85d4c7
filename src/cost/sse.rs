//! An incremental, bounded parser for `text/event-stream` bodies.
//!
//! Bytes arrive in frames split anywhere (inside a field name, between `\r` and `\n`,
//! in the middle of a multi-byte character). [`SseParser::feed`] keeps only the unfinished
//! line and the event being assembled, so memory stays bounded: a line longer than the
//! configured limit is dropped (and counted) instead of growing a buffer.
//!
//! ```
//! use palisade::cost::sse::SseParser;
//!
//! let mut parser = SseParser::new();
//! let mut seen = Vec::new();
//! for chunk in [&b"event: ping\r\nda"[..], b"ta: {\"a\":1}\r", b"\n\r\n: comment\n\ndata: x\n"] {
//!     parser.feed(chunk, |ev| seen.push((ev.event.to_vec(), ev.data.to_vec())));
//! }
//! parser.feed(b"data: y\n\n", |ev| seen.push((ev.event.to_vec(), ev.data.to_vec())));
//! assert_eq!(seen, vec![
//!     (b"ping".to_vec(), b"{\"a\":1}".to_vec()),
//!     (Vec::new(), b"x\ny".to_vec()),
//! ]);
//! ```

/// The default longest line kept (1 MiB); longer lines are dropped and counted.
pub const DEFAULT_MAX_LINE: usize = 1 << 20;

/// One dispatched event: its `event:` name (empty when absent) and its `data:` lines
/// joined with `\n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field, empty for the default `message` type.
    pub event: &'a [u8],
    /// The data lines joined by `\n`.
    pub data: &'a [u8],
}

/// An incremental `text/event-stream` parser (WHATWG HTML, "Parsing an event stream").
///
/// Handles `\r\n`, `\r` and `\n` line ends split across chunks, multi-line `data:`,
/// comments, `event:` names and the optional space after the colon. Lines longer than the
/// limit are discarded whole (see [`SseParser::overlong_lines`]); an event whose data would
/// exceed the limit is dropped too.
#[derive(Debug, Clone)]
pub struct SseParser {
    line: Vec<u8>,
    line_overflow: bool,
    after_cr: bool,
    event: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    data_overflow: bool,
    skip_data: bool,
    max_line: usize,
    overlong: u64,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    /// A parser with the default line limit ([`DEFAULT_MAX_LINE`]).
    pub fn new() -> Self {
        Self::with_max_line(DEFAULT_MAX_LINE)
    }

    /// A parser that keeps lines (and event data) of at most `max_line` bytes.
    pub fn with_max_line(max_line: usize) -> Self {
        Self {
            line: Vec::new(),
            line_overflow: false,
            after_cr: false,
            event: Vec::new(),
            data: Vec::new(),
            has_data: false,
            data_overflow: false,
            skip_data: false,
            max_line: max_line.max(1),
            overlong: 0,
        }
    }

    /// How many lines or events were dropped for exceeding the limit.
    pub fn overlong_lines(&self) -> u64 {
        self.overlong
    }

    /// Whether the parser stands at the start of a line (nothing of an unfinished line is
    /// held), so that a line appended now would be read as a line of its own.
    pub fn at_line_start(&self) -> bool {
        self.line.is_empty() && !self.line_overflow
    }

    /// Whether an event has begun (an `event:` or `data:` line) but not yet been ended by
    /// a blank line: appending a blank line now would dispatch it.
    pub fn event_pending(&self) -> bool {
        self.has_data || !self.event.is_empty() || !self.at_line_start()
    }

    /// Bytes currently held (unfinished line plus the event being assembled).
    pub fn buffered(&self) -> usize {
        self.line.len() + self.data.len() + self.event.len()
    }

    /// Feeds the next chunk; `on_event` is called for every event completed by it.
    pub fn feed(&mut self, chunk: &[u8], on_event: impl FnMut(SseEvent<'_>)) {
        self.feed_filtered(chunk, |_| true, on_event);
    }

    /// Like [`feed`](Self::feed), but the data of an event whose `event:` name (seen
    /// before its `data:` lines) makes `keep_data` return `false` is not copied: such an
    /// event is dispatched with empty data. Metering uses this to skip content deltas.
    pub fn feed_filtered(
        &mut self,
        mut chunk: &[u8],
        mut keep_data: impl FnMut(&[u8]) -> bool,
        mut on_event: impl FnMut(SseEvent<'_>),
    ) {
        let keep = &mut keep_data;
        if chunk.is_empty() {
            return;
        }
        if self.after_cr {
            self.after_cr = false;
            if let [b'\n', rest @ ..] = chunk {
                chunk = rest;
            }
        }
        while !chunk.is_empty() {
            match memchr::memchr2(b'\n', b'\r', chunk) {
                None => {
                    self.push_partial(chunk);
                    return;
                }
                Some(i) => {
                    let end = chunk[i];
                    let piece = &chunk[..i];
                    if self.line.is_empty() && !self.line_overflow {
                        if piece.len() > self.max_line {
                            self.overlong += 1;
                        } else {
                            self.process_line(piece, keep, &mut on_event);
                        }
                    } else {
                        self.push_partial(piece);
                        let line = std::mem::take(&mut self.line);
                        if self.line_overflow {
                            self.line_overflow = false;
                        } else {
                            self.process_line(&line, keep, &mut on_event);
                        }
                        self.line = line;
                        self.line.clear();
                    }
                    chunk = &chunk[i + 1..];
                    if end == b'\r' {
                        match chunk.first() {
                            Some(b'\n') => chunk = &chunk[1..],
                            Some(_) => {}
                            None => self.after_cr = true,
                        }
                    }
                }
            }
        }
    }

    /// Resets the parser at the end of a stream. Per the specification an event not yet
    /// terminated by a blank line is discarded.
    pub fn reset(&mut self) {
        self.line.clear();
        self.line_overflow = false;
        self.after_cr = false;
        self.clear_event();
    }

    fn push_partial(&mut self, piece: &[u8]) {
        if self.line_overflow {
            return;
        }
        if self.line.len() + piece.len() > self.max_line {
            self.line_overflow = true;
            self.overlong += 1;
            self.line.clear();
            self.line.shrink_to(self.max_line.min(4096));
        } else {
            self.line.extend_from_slice(piece);
        }
    }

    fn clear_event(&mut self) {
        self.event.clear();
        self.data.clear();
        self.has_data = false;
        self.data_overflow = false;
        self.skip_data = false;
    }

    fn process_line(
        &mut self,
        line: &[u8],
        keep: &mut impl FnMut(&[u8]) -> bool,
        on_event: &mut impl FnMut(SseEvent<'_>),
    ) {
        if line.is_empty() {
            if self.has_data && !self.data_overflow {
                on_event(SseEvent {
                    event: &self.event,
                    data: &self.data,
                });
            }
            self.clear_event();
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.data_overflow {
                    return;
                }
                if !self.has_data && !keep(&self.event) {
                    self.skip_data = true;
                }
                if self.skip_data {
                    self.has_data = true;
                    return;
                }
                let extra = value.len() + usize::from(self.has_data);
                if self.data.len() + extra > self.max_line {
                    self.data_overflow = true;
                    self.overlong += 1;
                    self.data.clear();
                    return;
                }
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event
                    .extend_from_slice(&value[..value.len().min(self.max_line)]);
            }
            _ => {} // `id`, `retry` and unknown fields do not matter for metering
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(parser: &mut SseParser, chunks: &[&[u8]]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for c in chunks {
            parser.feed(c, |ev| {
                out.push((
                    String::from_utf8_lossy(ev.event).into_owned(),
                    String::from_utf8_lossy(ev.data).into_owned(),
                ))
            });
        }
        out
    }

    #[test]
    fn line_endings_and_fields() {
        let text =
            b"event: a\rdata:1\r\ndata:  2\n\nid: 5\nretry: 3\n: c\ndata\n\n\n\nevent: only\n\n";
        let mut p = SseParser::new();
        let got = events(&mut p, &[text]);
        assert_eq!(
            got,
            vec![("a".into(), "1\n 2".into()), (String::new(), String::new()),]
        );
    }

    #[test]
    fn every_split_gives_the_same_events() {
        let text: &[u8] =
            b"event: x\r\ndata: {\"k\":\"\xc3\xa9\"}\r\n\r\n:c\r\rdata: a\rdata: b\r\r";
        let whole = events(&mut SseParser::new(), &[text]);
        assert_eq!(whole.len(), 2);
        for i in 0..=text.len() {
            for j in i..=text.len() {
                let got = events(
                    &mut SseParser::new(),
                    &[&text[..i], &text[i..j], &text[j..]],
                );
                assert_eq!(got, whole, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn endless_line_stays_bounded() {
        let mut p = SseParser::with_max_line(64);
        let chunk = [b'a'; 1000];
        for _ in 0..100 {
            p.feed(&chunk, |_| panic!("no event"));
            assert!(p.buffered() <= 64);
        }
        let got = events(&mut p, &[b"\ndata: ok\n\n"]);
        assert_eq!(got, vec![(String::new(), "ok".into())]);
        assert_eq!(p.overlong_lines(), 1);
        // data lines that add up past the limit drop that event only
        let mut p = SseParser::with_max_line(12);
        let got = events(&mut p, &[b"data: 123456\ndata: 654321\n\ndata: z\n\n"]);
        assert_eq!(got, vec![(String::new(), "z".into())]);
        assert_eq!(p.overlong_lines(), 1);
    }

    #[test]
    fn filtered_events_skip_their_data() {
        let mut p = SseParser::new();
        let mut got = Vec::new();
        p.feed_filtered(
            b"event: delta\ndata: big\n\nevent: usage\ndata: 1\n\ndata: 2\nevent: delta\ndata: 3\n\n",
            |name| name != b"delta",
            |ev| got.push((ev.event.to_vec(), ev.data.to_vec())),
        );
        assert_eq!(
            got,
            vec![
                (b"delta".to_vec(), Vec::new()),
                (b"usage".to_vec(), b"1".to_vec()),
                (b"delta".to_vec(), b"2\n3".to_vec()),
            ]
        );
    }

    #[test]
    fn unterminated_event_is_discarded_on_reset() {
        let mut p = SseParser::new();
        assert!(events(&mut p, &[b"data: half"]).is_empty());
        p.reset();
        assert_eq!(
            events(&mut p, &[b"data: b\n\n"]),
            vec![(String::new(), "b".into())]
        );
    }
}
