//! A fast reader of [`View`]s: it checks a JSON text as it skips it, building only the
//! members of [`KEYS`](super::json_view::KEYS), without going through a serde visitor for
//! every value it drops.
//!
//! [`parse`] never decides alone that a text is invalid: it answers `Some(view)` only for
//! texts it has checked completely and that `serde_json` accepts too (with the view the
//! serde path builds), and `None` ("not decided here") for anything else, which then goes
//! to the serde path. So a text serde rejects is rejected as before (the usage reader counts
//! a parse failure and reads no usage from it), and the fast path only has to be right
//! about what it accepts. What it leaves to serde: invalid UTF-8, control characters or
//! unknown escapes in strings, `\u` escapes of surrogates, numbers with a positive exponent
//! or more than 300 integer digits (which may be out of `f64`'s range), nesting deeper than
//! 100, and any syntax error. Kept numbers and kept strings with escapes are read by serde
//! itself from their own bytes, so their values are serde's to the bit.

use std::borrow::Cow;

use super::json_view::{KEYS, View};

/// Deeper nesting goes to serde (whose limit is 128 levels).
const MAX_DEPTH: u32 = 100;

/// The most integer digits of a number skipped here: below `f64::MAX` (about 1.8e308)
/// whatever follows them.
const MAX_INT_DIGITS: usize = 300;

/// The view of `text`, when this reader can vouch for it (see the [module docs](self)).
pub(crate) fn parse(text: &[u8]) -> Option<View<'_>> {
    let mut r = Reader { b: text, i: 0 };
    r.ws();
    let v = r.value(0)?;
    r.ws();
    (r.i == r.b.len()).then_some(v)
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// A value that is kept (its view is built).
    fn value(&mut self, depth: u32) -> Option<View<'a>> {
        match self.peek()? {
            b'{' => self.object(depth + 1),
            b'[' => {
                self.array(depth + 1)?;
                Some(View::Array)
            }
            b'"' => {
                let start = self.i;
                let escaped = self.string()?;
                if escaped {
                    serde_json::from_slice(&self.b[start..self.i]).ok()
                } else {
                    let text = std::str::from_utf8(&self.b[start + 1..self.i - 1]).ok()?;
                    Some(View::String(Cow::Borrowed(text)))
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = self.i;
                self.number()?;
                let text = &self.b[start..self.i];
                // A token count: a plain integer of at most 19 digits, which serde reads
                // as that `u64` too. Anything else (signs, fractions, exponents, longer
                // numbers) is serde's to read.
                if text.len() <= 19 && text.iter().all(u8::is_ascii_digit) {
                    let n = text.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                    return Some(View::Number(n.into()));
                }
                serde_json::from_slice(text).ok()
            }
            _ => {
                let lit = self.literal()?;
                Some(lit)
            }
        }
    }

    /// A value that is checked and dropped.
    fn skip(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'{' => self.skip_object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => self.string().map(drop),
            b'-' | b'0'..=b'9' => self.number(),
            _ => self.literal().map(drop),
        }
    }

    fn literal(&mut self) -> Option<View<'a>> {
        let rest = &self.b[self.i..];
        let (len, v) = if rest.starts_with(b"true") {
            (4, View::Bool(true))
        } else if rest.starts_with(b"false") {
            (5, View::Bool(false))
        } else if rest.starts_with(b"null") {
            (4, View::Null)
        } else {
            return None;
        };
        self.i += len;
        Some(v)
    }

    /// Passes `expected` (after whitespace).
    fn eat(&mut self, expected: u8) -> Option<()> {
        self.ws();
        (self.peek()? == expected).then(|| self.i += 1)
    }

    fn object(&mut self, depth: u32) -> Option<View<'a>> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.i += 1; // `{`
        let mut members = Vec::new();
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(View::Object(members));
        }
        loop {
            self.ws();
            let key = self.key()?;
            self.eat(b':')?;
            self.ws();
            match key {
                Some(key) => members.push((key, self.value(depth)?)),
                None => self.skip(depth)?,
            }
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(View::Object(members));
                }
                _ => return None,
            }
        }
    }

    fn skip_object(&mut self, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.i += 1; // `{`
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            if self.peek()? != b'"' {
                return None;
            }
            self.string()?;
            self.eat(b':')?;
            self.ws();
            self.skip(depth)?;
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn array(&mut self, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.i += 1; // `[`
        self.ws();
        if self.peek()? == b']' {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            self.skip(depth)?;
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// An object's key: which of [`KEYS`] it is, if any, as serde decodes it.
    fn key(&mut self) -> Option<Option<&'static str>> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.i;
        let escaped = self.string()?;
        if escaped {
            let key = serde_json::from_slice::<String>(&self.b[start..self.i]).ok()?;
            Some(KEYS.iter().copied().find(|k| *k == key))
        } else {
            let key = &self.b[start + 1..self.i - 1];
            Some(KEYS.iter().copied().find(|k| k.as_bytes() == key))
        }
    }

    /// Passes a string (from its opening quote); whether it holds escapes. A string with
    /// bytes past ASCII is checked as UTF-8 on its own (JSON allows them nowhere else).
    fn string(&mut self) -> Option<bool> {
        self.i += 1; // `"`
        let start = self.i;
        let mut escaped = false;
        let mut wide = false;
        loop {
            let (at, past_ascii) = plain_run(&self.b[self.i..])?;
            wide |= past_ascii;
            let stop = self.b[self.i + at];
            self.i += at + 1;
            if stop == b'"' {
                if wide {
                    std::str::from_utf8(&self.b[start..self.i - 1]).ok()?;
                }
                return Some(escaped);
            }
            escaped = true;
            self.escape()?;
        }
    }

    /// Passes the escape after a backslash.
    fn escape(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
            b'u' => {
                let hex = self.b.get(self.i + 1..self.i + 5)?;
                let mut unit = 0u32;
                for &h in hex {
                    unit = unit * 16 + char::from(h).to_digit(16)?;
                }
                if (0xD800..=0xDFFF).contains(&unit) {
                    return None; // surrogates: serde's rules for pairs apply
                }
                self.i += 5;
            }
            _ => return None,
        }
        Some(())
    }

    /// Passes a number whose value is surely in `f64`'s range.
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let int = self.digits();
        match int {
            0 => return None,
            1 => {}
            n if n > MAX_INT_DIGITS || self.b[self.i - n] == b'0' => return None,
            _ => {}
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            // Only a negative exponent: the value can only shrink (to 0 at worst).
            if self.b.get(self.i + 1) != Some(&b'-') {
                return None;
            }
            self.i += 2;
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.b.get(self.i) {
            self.i += 1;
        }
        self.i - start
    }
}

/// Where the plain text at the start of a string's `bytes` ends: the index of the first
/// quote or backslash, and whether a byte past ASCII came before it; `None` when a control
/// character (below 0x20) comes first or nothing ends it.
fn plain_run(bytes: &[u8]) -> Option<(usize, bool)> {
    // Keys and short values end within a few words: read those a word at a time, and a
    // longer text with memchr, which reads many bytes at a time.
    let (at, wide) = match short_run(bytes) {
        Ok(found) => found,
        Err((checked, wide)) => {
            let at = checked + memchr::memchr2(b'"', b'\\', &bytes[checked..])?;
            let (lowest, highest) = byte_range(&bytes[checked..at]);
            if lowest < 0x20 {
                return None;
            }
            (at, wide || highest >= 0x80)
        }
    };
    (bytes[at] >= 0x20).then_some((at, wide))
}

/// The words [`short_run`] reads before it leaves a string to memchr.
const SHORT_WORDS: usize = 4;

/// Where the plain text at the start of a string's `bytes` ends, when it ends within
/// [`SHORT_WORDS`] words: the index of the first quote, backslash or control character
/// (below 0x20), and whether a byte past ASCII came before it. Otherwise `Err` with how
/// many bytes were read and found plain, and whether one of them was past ASCII.
///
/// For a word `x`, `(x - 0x01…01) & !x & 0x80…80` marks its zero bytes and
/// `(x - 0x20…20) & !x & 0x80…80` its bytes below 0x20. A mark can be wrong only in a byte
/// above a true one (a borrow runs upwards), so the lowest mark, the first such byte in
/// memory order, is always right.
fn short_run(bytes: &[u8]) -> Result<(usize, bool), (usize, bool)> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const QUOTES: u64 = ONES * b'"' as u64;
    const BACKSLASHES: u64 = ONES * b'\\' as u64;
    const SPACES: u64 = ONES * 0x20;
    let mut wide = 0;
    let mut rest = bytes;
    for _ in 0..SHORT_WORDS {
        let Some((word, tail)) = rest.split_first_chunk::<8>() else {
            break;
        };
        let w = u64::from_le_bytes(*word);
        let q = w ^ QUOTES;
        let s = w ^ BACKSLASHES;
        let marks =
            (q.wrapping_sub(ONES) & !q | s.wrapping_sub(ONES) & !s | w.wrapping_sub(SPACES) & !w)
                & HIGH;
        if marks != 0 {
            let bits = marks.trailing_zeros();
            // The bytes before the mark (`bits` is 7, 15, …, 63).
            wide |= w & HIGH & ((1 << bits) - 1);
            return Ok((bytes.len() - rest.len() + bits as usize / 8, wide != 0));
        }
        wide |= w & HIGH;
        rest = tail;
    }
    if rest.len() >= 8 {
        return Err((bytes.len() - rest.len(), wide != 0));
    }
    for (j, &b) in rest.iter().enumerate() {
        if b == b'"' || b == b'\\' || b < 0x20 {
            return Ok((bytes.len() - rest.len() + j, wide != 0));
        }
        wide |= u64::from(b & 0x80);
    }
    // The string does not end within `bytes` at all.
    Err((bytes.len(), wide != 0))
}

/// The lowest and the highest byte of `bytes` (`(0xFF, 0)` when empty), in one pass
/// without an early exit, so that it runs over many bytes at a time.
fn byte_range(bytes: &[u8]) -> (u8, u8) {
    let (mut lo, mut hi) = (u8::MAX, 0);
    for &b in bytes {
        lo = lo.min(b);
        hi = hi.max(b);
    }
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn serde_view(t: &[u8]) -> Option<View<'_>> {
        serde_json::from_slice(t).ok()
    }

    #[test]
    fn decides_ordinary_answers_and_leaves_the_doubtful_to_serde() {
        let answer = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-opus-4-7",
            "content":[{"type":"text","text":"line\nnext \"quoted\" caf\u00e9 \/ x"}],"stop_sequence":null,
            "usage":{"input_tokens":6,"cache_creation":{"ephemeral_5m_input_tokens":1,"x":[1.5e-3,-0,true]},
            "output_tokens":2745.0}, "logprob": -1.25e-05 }"#;
        let fast = parse(answer).expect("an ordinary answer is decided here");
        assert_eq!(Some(fast), serde_view(answer));
        for doubtful in [
            &br#"{"a":1e5}"#[..],
            br#"{"a":1E+5}"#,
            br#"{"a":"\ud83d\ude00"}"#,
            br#"{"a":"\ud800"}"#,
            b"{\"a\":\"\x01\"}",
            b"{\"a\":\"\xff\"}",
            br#"{"a":01}"#,
            br#"{"a":1.}"#,
            br#"{"a":-}"#,
            br#"{"a":"\x"}"#,
            br#"{"a":1,}"#,
            br#"{"a" 1}"#,
            br#"[1,]"#,
            br#"{"a":tru}"#,
            br#"{"a":1} x"#,
            b"\xef\xbb\xbf{}",
            b"",
        ] {
            assert_eq!(
                parse(doubtful),
                None,
                "{}",
                String::from_utf8_lossy(doubtful)
            );
        }
        let deep = format!("{}{}", "[".repeat(101), "]".repeat(101));
        assert_eq!(parse(deep.as_bytes()), None);
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(parse(deep.as_bytes()), Some(View::Array));
        let long = format!("{{\"a\":{}}}", "9".repeat(301));
        assert_eq!(parse(long.as_bytes()), None);
    }

    #[test]
    fn kept_values_are_serdes_own() {
        let t = br#"{"model":"a\"b\u00e9","usage":{"input_tokens":18446744073709551616,"output_tokens":-0,"cache_read_input_tokens":1.0e-2,"cache_creation_input_tokens":9999999999999999999,"web_search_requests":0},"us\u0061ge":{"input_tokens":3,"output_tokens":-9223372036854775808}}"#;
        assert_eq!(parse(t), serde_view(t));
        assert!(parse(t).is_some());
    }

    /// Real answers: every `data:` payload of the recorded streams, and a whole JSON answer
    /// with a long text of escapes and non-ASCII letters.
    fn real_answers() -> Vec<Vec<u8>> {
        let streams: [&[u8]; 5] = [
            include_bytes!("../../tests/cost_data/anthropic_opus47.sse"),
            include_bytes!("../../tests/cost_data/anthropic_opus47_1h.sse"),
            include_bytes!("../../tests/cost_data/anthropic_sonnet37.sse"),
            include_bytes!("../../tests/cost_data/openai_gpt4o.sse"),
            include_bytes!("../../tests/cost_data/openai_responses.sse"),
        ];
        let mut out: Vec<Vec<u8>> = streams
            .iter()
            .flat_map(|s| s.split(|b| *b == b'\n'))
            .filter_map(|line| line.strip_prefix(b"data: "))
            .filter(|d| d.starts_with(b"{"))
            .map(<[u8]>::to_vec)
            .collect();
        let text = "Voilà: a \"quoted\" line,\n\ta tab, a slash / and 表 — ".repeat(40);
        out.push(
            serde_json::to_vec(&serde_json::json!({
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-opus-4-7",
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 6, "cache_creation_input_tokens": 159_217,
                    "cache_read_input_tokens": 0, "output_tokens": 2745,
                    "cache_creation": {"ephemeral_5m_input_tokens": 159_000,
                        "ephemeral_1h_input_tokens": 217}}
            }))
            .unwrap(),
        );
        out
    }

    #[test]
    fn real_answers_are_decided_here() {
        let answers = real_answers();
        let decided = answers.iter().filter(|a| parse(a).is_some()).count();
        let valid = answers.iter().filter(|a| serde_view(a).is_some()).count();
        assert!(valid > 20, "{valid} valid answers");
        assert_eq!(decided, valid);
    }

    /// Bytes replaced, dropped or inserted from an alphabet of near-misses.
    fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
        let edit = (
            any::<prop::sample::Index>(),
            0u8..3,
            prop::sample::select(vec![
                &b"\""[..],
                b"\\",
                b"\\u0075",
                b"\\ud800",
                b"\\udc00",
                b"\\ud83d\\ude00",
                b"1e400",
                b"1e-400",
                b"9e-99999999999",
                b"-0",
                b"0",
                b".",
                b"e",
                b"-",
                b"\xff",
                b"\xc3\xa9",
                b"\xc3",
                b"\x01",
                b"\x1f",
                b"\x7f",
                b" ",
                b"\t",
                b"\x0c",
                b",",
                b":",
                b"{",
                b"}",
                b"[",
                b"]",
                b"null",
                b"tru",
                br#","usage":{"input_tokens":3}"#,
                br#","model":"m""#,
                br#"\u006d"#,
            ]),
        );
        prop::collection::vec(edit, 0..4).prop_map(move |edits| {
            let mut t = base.clone();
            crate::cost::json_view::props::damage(&mut t, edits);
            t
        })
    }

    fn real_mutated() -> impl Strategy<Value = Vec<u8>> {
        prop::sample::select(real_answers()).prop_flat_map(mutated)
    }

    /// Arbitrary bytes from JSON's alphabet: mostly invalid, sometimes valid in odd ways.
    fn json_ish() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop::sample::select(
                b" \t\n\r{}[]:,\"\\/0123456789-+.eEbfnrtu aluseknmod\x00\x1f\xc3\xa9\xff".to_vec(),
            ),
            0..48,
        )
    }

    /// [`plain_run`] byte by byte.
    fn plain_run_bytewise(bytes: &[u8]) -> Option<(usize, bool)> {
        let at = bytes
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
            .filter(|&at| bytes[at] >= 0x20)?;
        Some((at, bytes[..at].iter().any(|&b| b >= 0x80)))
    }

    #[test]
    fn a_string_ends_at_its_first_quote_backslash_or_control_wherever_it_is() {
        for stop in [b'"', b'\\', 0x00, 0x1f] {
            for len in 0..48 {
                for wide_at in [None, Some(0), Some(len / 2), Some(len + 1)] {
                    let mut t = vec![b'a'; len + 9];
                    if let Some(w) = wide_at {
                        t[w] = 0xe9;
                    }
                    t[len] = stop;
                    assert_eq!(plain_run(&t), plain_run_bytewise(&t), "{t:?}");
                    let found = (stop >= 0x20).then_some(len);
                    assert_eq!(plain_run(&t).map(|r| r.0), found);
                }
            }
        }
        for len in 0..48 {
            assert_eq!(short_run(&vec![b'a'; len]).ok(), None);
        }
    }

    /// What a string can be made of: letters, every escape (surrogates, pairs, short and
    /// unknown ones too), control bytes, UTF-8 of one to four bytes, and bytes that are
    /// not UTF-8 (a lone continuation, a cut sequence, an encoded surrogate, overlong and
    /// out-of-range forms).
    const PIECES: &[&[u8]] = &[
        b"a",
        b"\\\"",
        b"\\\\",
        b"\\/",
        b"\\b",
        b"\\n",
        b"\\t",
        b"\\u0041",
        b"\\u00e9",
        b"\\u0000",
        b"\\uFFFF",
        b"\\ud83d\\ude00",
        b"\\ud800",
        b"\\udfff",
        b"\\ud83da",
        b"\\u12",
        b"\\u12g4",
        b"\\x",
        b"\\",
        b"\x00",
        b"\x1f",
        b"\x7f",
        b"\xc3\xa9",
        b"\xe8\xa1\xa8",
        b"\xf0\x9f\x98\x80",
        b"\x80",
        b"\xff",
        b"\xc3",
        b"\xe8\xa1",
        b"\xed\xa0\x80",
        b"\xc0\x80",
        b"\xf4\x90\x80\x80",
        b"\"",
    ];

    /// Where a string goes: the value of a kept member, the value of a dropped one, a key
    /// (kept or not), and an array element; a usage object follows each.
    fn in_every_place(s: &[u8]) -> [Vec<u8>; 4] {
        let tail = &br#","usage":{"input_tokens":7,"output_tokens":8}}"#[..];
        let wrap = |head: &[u8], after: &[u8]| [head, s, after, tail].concat();
        [
            wrap(br#"{"model":""#, b"\""),
            wrap(br#"{"text":""#, b"\""),
            wrap(br#"{""#, br#"":{"input_tokens":1}"#),
            wrap(br#"{"content":[""#, br#"",1]"#),
        ]
    }

    /// The fast reader's answer is serde's (when it gives one), and an ordinary text is
    /// decided here.
    fn agrees(t: &[u8]) {
        if let Some(fast) = parse(t) {
            assert_eq!(
                Some(fast),
                serde_view(t),
                "{:?}",
                String::from_utf8_lossy(t)
            );
        }
    }

    #[test]
    fn every_piece_at_every_offset_of_a_string_reads_as_serde_reads_it() {
        for len in 0..=41 {
            for piece in PIECES {
                for at in 0..=len {
                    let s = [&b"a".repeat(at)[..], piece, &b"b".repeat(len - at)].concat();
                    for t in in_every_place(&s) {
                        agrees(&t);
                        // Plain UTF-8 and the escapes serde takes without a second look
                        // are decided here (a text left to serde costs a second parse).
                        let plain = !piece.starts_with(b"\\u") || piece[2] != b'd';
                        if plain && serde_view(&t).is_some() && piece.len() > 1 {
                            assert!(parse(&t).is_some(), "{:?}", String::from_utf8_lossy(&t));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_text_cut_at_every_byte_is_never_read() {
        let mut texts = real_answers();
        for piece in PIECES {
            let s = [&b"x".repeat(30)[..], piece, &b"y".repeat(5)].concat();
            texts.extend(in_every_place(&s));
        }
        for t in &texts {
            for end in 0..t.len() {
                let cut = &t[..end];
                agrees(cut);
                if serde_view(cut).is_none() {
                    assert_eq!(parse(cut), None, "{:?}", String::from_utf8_lossy(cut));
                }
            }
        }
    }

    #[test]
    fn decoy_keys_in_strings_and_repeated_keys_read_as_serde_reads_them() {
        for t in [
            &br#"{"text":"\"usage\":{\"input_tokens\":999}","usage":{"input_tokens":3}}"#[..],
            br#"{"usage":{"input_tokens":3,"note":"\"input_tokens\":999"}}"#,
            br#"{"usage\"":{"input_tokens":999},"usage":{"input_tokens":3}}"#,
            br#"{"usage":{"input_tokens":999},"usage":{"input_tokens":3}}"#,
            br#"{"usage":{"input_tokens":999,"input_tokens":3}}"#,
            br#"{"usage":{"input_tokens":3},"usage":null}"#,
            br#"{"us\u0061ge":{"input_tokens":999},"usage":{"input_tokens":3}}"#,
            br#"{"usage":{"input_tokens":999},"us\u0061ge":{"input_\u0074okens":3}}"#,
            br#"{"\"usage":{"input_tokens":999},"usage":{"input_tokens":3}}"#,
            br#"{"usage ":{"input_tokens":999},"usage":{"input_tokens":3}}"#,
            br#"{"usage":{"input_tokens":3,"x":{"input_tokens":999}}}"#,
            br#"{"usage":{"input_tokens":3},"x":["usage",{"usage":{"input_tokens":999}}]}"#,
        ] {
            let fast = parse(t).expect("decided here");
            assert_eq!(Some(&fast), serde_view(t).as_ref());
            let tokens = fast
                .get("usage")
                .and_then(|u| u.get("input_tokens"))
                .and_then(View::as_number)
                .and_then(serde_json::Number::as_u64);
            let whole: serde_json::Value = serde_json::from_slice(t).unwrap();
            assert_eq!(tokens, whole["usage"]["input_tokens"].as_u64(), "{t:?}");
        }
    }

    /// A string of [`PIECES`], mostly letters.
    fn adversarial_string() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop_oneof![
                6 => Just(&b"a"[..]),
                4 => prop::sample::select(PIECES),
            ],
            0..48,
        )
        .prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Strings of escapes, control bytes and (in)valid UTF-8 in every place, whole or
        /// cut anywhere: what the fast reader decides, serde decides the same way.
        #[test]
        fn adversarial_strings_read_as_serde_reads_them(
            s in adversarial_string(),
            place in 0usize..4,
            cut in any::<prop::sample::Index>(),
        ) {
            let t = in_every_place(&s)[place].clone();
            if let Some(fast) = parse(&t) {
                prop_assert_eq!(Some(fast), serde_view(&t));
            }
            let cut = &t[..cut.index(t.len() + 1)];
            if let Some(fast) = parse(cut) {
                prop_assert_eq!(Some(fast), serde_view(cut));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// A string's plain text ends where a byte-at-a-time scan says it does.
        #[test]
        fn plain_run_agrees_with_a_bytewise_scan(
            t in prop::collection::vec(
                prop_oneof![
                    16 => 0x20u8..0x80,
                    1 => prop::sample::select(b"\"\\\x00\x1f\x7f\x80\xc3\xa9\xff".to_vec()),
                    1 => any::<u8>(),
                ],
                0..100,
            ),
        ) {
            prop_assert_eq!(plain_run(&t), plain_run_bytewise(&t));
        }

        /// What the fast reader decides, serde decides the same way with the same view;
        /// what serde rejects, the fast reader never accepts.
        #[test]
        fn fast_reader_agrees_with_serde(t in prop_oneof![3 => real_mutated(), 1 => json_ish()]) {
            if let Some(fast) = parse(&t) {
                prop_assert_eq!(Some(fast), serde_view(&t), "{}", String::from_utf8_lossy(&t));
            }
        }
    }
}
