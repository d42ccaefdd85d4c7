//! An incremental reader of chosen top-level members of one JSON object, in bounded
//! memory: used for request bodies (`metadata`) and for response bodies too large to
//! buffer (`model`, `usage`).
//!
//! Only members of the outermost object count: a `"metadata"` or `"usage"` nested inside a
//! message, a tool schema or a string is never taken. Values are kept raw (at most
//! `max_value` bytes each; larger ones are dropped) for the caller to parse.

/// What the scan has found: the raw value of each wanted key (the last one seen wins).
#[derive(Debug)]
pub(crate) struct TopLevelScan {
    keys: &'static [&'static str],
    max_value: usize,
    depth: u32,
    in_string: bool,
    escaped: bool,
    expect_key: bool,
    key: Vec<u8>,
    key_capture: bool,
    /// The wanted key whose value comes next.
    pending: Option<usize>,
    capture: Option<Capture>,
    values: Vec<Option<Vec<u8>>>,
    state: ScanState,
}

#[derive(Debug)]
struct Capture {
    key: usize,
    buf: Vec<u8>,
    string: bool,
    overflow: bool,
}

/// Where the scan stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScanState {
    /// Before the object's opening brace.
    Start,
    /// Inside the object.
    Inside,
    /// The object closed: the document is complete.
    Closed,
    /// The text is not a JSON object.
    NotAnObject,
}

/// The longest key compared (longer keys are not wanted ones).
const MAX_KEY: usize = 64;

impl TopLevelScan {
    /// A scan for `keys`, keeping values of at most `max_value` bytes.
    pub(crate) fn new(keys: &'static [&'static str], max_value: usize) -> Self {
        Self {
            keys,
            max_value,
            depth: 0,
            in_string: false,
            escaped: false,
            expect_key: false,
            key: Vec::new(),
            key_capture: false,
            pending: None,
            capture: None,
            values: keys.iter().map(|_| None).collect(),
            state: ScanState::Start,
        }
    }

    /// Where the scan stands.
    pub(crate) fn state(&self) -> ScanState {
        self.state
    }

    /// The raw value of `keys[i]`, if a whole one was seen.
    pub(crate) fn value(&self, i: usize) -> Option<&[u8]> {
        self.values.get(i)?.as_deref()
    }

    /// Feeds the next bytes of the document.
    pub(crate) fn feed(&mut self, data: &[u8]) {
        for &b in data {
            if matches!(self.state, ScanState::Closed | ScanState::NotAnObject) {
                return;
            }
            self.byte(b);
        }
    }

    fn byte(&mut self, b: u8) {
        if let Some(c) = self.capture.as_mut() {
            if c.buf.len() < self.max_value {
                c.buf.push(b);
            } else {
                c.overflow = true;
            }
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.key_capture {
                    self.key_capture = false;
                    self.pending = self.wanted_key();
                } else if self.depth == 1 && self.capture.as_ref().is_some_and(|c| c.string) {
                    self.complete();
                }
                return;
            }
            if self.key_capture && self.key.len() <= MAX_KEY {
                self.key.push(b);
            }
            return;
        }
        if b.is_ascii_whitespace() {
            return;
        }
        if self.state == ScanState::Start {
            if b == b'{' {
                self.state = ScanState::Inside;
                self.depth = 1;
                self.expect_key = true;
            } else if b != 0xEF && b != 0xBB && b != 0xBF {
                // (a UTF-8 byte order mark is tolerated)
                self.state = ScanState::NotAnObject;
            }
            return;
        }
        let top = self.depth == 1;
        match b {
            b'"' => {
                self.in_string = true;
                if top && self.expect_key {
                    self.key_capture = true;
                    self.key.clear();
                } else if top {
                    self.start_capture(b, true);
                }
            }
            b'{' | b'[' => {
                if top {
                    self.start_capture(b, false);
                }
                self.depth += 1;
            }
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 1 && self.capture.is_some() {
                    self.complete();
                } else if self.depth == 0 {
                    self.state = ScanState::Closed;
                }
            }
            b',' if top => {
                self.expect_key = true;
                self.pending = None;
            }
            b':' if top => self.expect_key = false,
            _ if top => self.pending = None, // a number or literal: never wanted
            _ => {}
        }
    }

    /// Which wanted key the key just read is, as a JSON reader reads it: escapes
    /// (`"us\u0061ge"`) are decoded first.
    fn wanted_key(&self) -> Option<usize> {
        if self.key.len() > MAX_KEY {
            return None;
        }
        if !self.key.contains(&b'\\') {
            return self.keys.iter().position(|k| k.as_bytes() == self.key);
        }
        let mut quoted = Vec::with_capacity(self.key.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(&self.key);
        quoted.push(b'"');
        let key = serde_json::from_slice::<String>(&quoted).ok()?;
        self.keys.iter().position(|k| *k == key)
    }

    fn start_capture(&mut self, first: u8, string: bool) {
        if let Some(key) = self.pending.take() {
            self.capture = Some(Capture {
                key,
                buf: vec![first],
                string,
                overflow: false,
            });
        }
    }

    fn complete(&mut self) {
        if let Some(c) = self.capture.take() {
            if !c.overflow {
                self.values[c.key] = Some(c.buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[&str] = &["model", "usage", "metadata"];

    fn scan(text: &[u8], split: usize) -> TopLevelScan {
        let mut s = TopLevelScan::new(KEYS, 256);
        for chunk in text.chunks(split.max(1)) {
            s.feed(chunk);
        }
        s
    }

    #[test]
    fn nested_and_quoted_decoys_are_ignored_at_every_split() {
        let text = br#"{"tools":[{"name":"t","input_schema":{"metadata":{"user_id":"decoy"},"model":"x"}}],
            "messages":[{"role":"user","content":"\"usage\": {\"output_tokens\": 9}"}],
            "model" : "claude-opus-4-7", "n": 3, "metadata":{"user_id":"real\"one"},
            "usage":{"input_tokens":6,"nested":{"a":[1,2]}}}"#;
        for split in 1..text.len() {
            let s = scan(text, split);
            assert_eq!(
                s.value(0),
                Some(&br#""claude-opus-4-7""#[..]),
                "split {split}"
            );
            assert_eq!(
                s.value(1),
                Some(&br#"{"input_tokens":6,"nested":{"a":[1,2]}}"#[..])
            );
            assert_eq!(s.value(2), Some(&br#"{"user_id":"real\"one"}"#[..]));
            assert_eq!(s.state(), ScanState::Closed);
        }
    }

    #[test]
    fn escaped_keys_match_as_a_json_reader_reads_them() {
        // `"us\u0061ge"` is the key `usage` to every JSON reader (the provider's
        // included): the scan must agree, at every split.
        let text = br#"{"m\u006fdel":"m","content":[{"\u0075sage":1}],"us\u0061ge":{"output_tokens":9},"metad\u0061t\u0061x":{"a":1}}"#;
        for split in 1..text.len() {
            let s = scan(text, split);
            assert_eq!(s.value(0), Some(&br#""m""#[..]), "split {split}");
            assert_eq!(s.value(1), Some(&br#"{"output_tokens":9}"#[..]));
            assert_eq!(s.value(2), None, "a longer key is not `metadata`");
        }
        let whole: serde_json::Value = serde_json::from_slice(text).unwrap();
        assert_eq!(whole["usage"]["output_tokens"], 9);
    }

    #[test]
    fn oversize_values_and_non_objects_are_dropped() {
        let mut s = TopLevelScan::new(KEYS, 8);
        s.feed(br#"{"model":"a-very-long-model-name","usage":{"a":1}}"#);
        assert_eq!(s.value(0), None);
        assert_eq!(s.value(1), Some(&br#"{"a":1}"#[..]));
        let mut s = TopLevelScan::new(KEYS, 8);
        s.feed(br#"[{"model":"m"}]"#);
        assert_eq!(s.state(), ScanState::NotAnObject);
        assert_eq!(s.value(0), None);
        let mut s = TopLevelScan::new(KEYS, 64);
        s.feed(br#"{"model":null,"usage":5,"metadata":"#);
        assert_eq!((s.value(0), s.value(1)), (None, None));
        assert_eq!(s.state(), ScanState::Inside);
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-z\"\\\\{}\\[\\]:, ]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("model".to_owned()),
                        Just("usage".to_owned()),
                        "[a-z]{1,6}"
                    ],
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The incremental scan agrees with a whole parse on the top-level members, at any
        /// chunking, whatever the nesting and quoting around them.
        #[test]
        fn scan_agrees_with_a_whole_parse(
            doc in prop::collection::btree_map(
                prop_oneof![Just("model".to_owned()), Just("usage".to_owned()), "[a-z]{1,6}"],
                value(),
                0..6,
            ),
            pretty in any::<bool>(),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let doc = Value::Object(doc.into_iter().collect());
            let text = if pretty {
                serde_json::to_vec_pretty(&doc).unwrap()
            } else {
                serde_json::to_vec(&doc).unwrap()
            };
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (text.len() + 1)).collect();
            cuts.sort_unstable();
            let mut scan = TopLevelScan::new(&["model", "usage"], 1 << 20);
            let mut last = 0;
            for c in cuts.into_iter().chain([text.len()]) {
                scan.feed(&text[last..c]);
                last = c;
            }
            prop_assert_eq!(scan.state(), ScanState::Closed);
            for (i, key) in ["model", "usage"].iter().enumerate() {
                let want = doc.get(*key).filter(|v| v.is_object() || v.is_array() || v.is_string());
                let got = scan.value(i).map(|raw| serde_json::from_slice::<Value>(raw).unwrap());
                prop_assert_eq!(got.as_ref(), want);
            }
        }
    }
}
