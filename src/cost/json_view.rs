//! A borrowed view of a JSON document that keeps only the members the usage reader looks
//! at, so reading a response's usage allocates next to nothing.
//!
//! Parsing a whole response into a `serde_json::Value` allocates a string for every key
//! and text and a map for every object; the usage reader then looks at a dozen members.
//! [`View::parse`] runs the same parser over the same text (so it accepts and rejects
//! exactly the documents `serde_json::from_slice::<Value>` does) but keeps an object member
//! only when its key is one of [`KEYS`], borrows strings from the text, and keeps no array
//! element. Every lookup the usage reader makes (with keys from [`KEYS`]) gives the answer
//! the full `Value` would: a property test below holds the two side by side.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Number;

/// Every key the usage reader looks up, at any depth. A lookup with another key is a bug
/// (checked in debug builds): its member was never kept.
pub(crate) const KEYS: &[&str] = &[
    "type",
    "object",
    "model",
    "usage",
    "error",
    "choices",
    "response",
    "message",
    "status",
    "code",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation",
    "cache_creation_input_tokens",
    "ephemeral_5m_input_tokens",
    "ephemeral_1h_input_tokens",
    "server_tool_use",
    "web_search_requests",
    "input_tokens_details",
    "output_tokens_details",
    "cached_tokens",
    "prompt_tokens",
    "prompt_tokens_details",
    "completion_tokens",
];

/// A JSON value with only the members named in [`KEYS`] kept.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum View<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    /// An array; its elements are checked for syntax and dropped.
    Array,
    /// An object's members whose key is in [`KEYS`], in document order, repeats included
    /// (the last one counts, as in a `Value`).
    Object(Vec<(&'static str, View<'a>)>),
}

impl<'a> View<'a> {
    /// Parses one JSON document; `None` when `serde_json::from_slice::<Value>` would fail.
    /// The [fast reader](super::json_fast) takes the texts it can vouch for; the others
    /// go through serde.
    pub(crate) fn parse(text: &'a [u8]) -> Option<Self> {
        super::json_fast::parse(text).or_else(|| Self::parse_serde(text))
    }

    /// Parses one JSON document through serde's parser alone.
    pub(crate) fn parse_serde(text: &'a [u8]) -> Option<Self> {
        serde_json::from_slice(text).ok()
    }

    /// The member `key` of an object (the last one of that name); `None` for anything
    /// else, as `Value::get` with a string key.
    pub(crate) fn get(&self, key: &str) -> Option<&View<'a>> {
        debug_assert!(KEYS.contains(&key), "`{key}` is not kept by View");
        match self {
            View::Object(members) => members.iter().rev().find(|(k, _)| *k == key).map(|m| &m.1),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            View::String(s) => Some(s),
            _ => None,
        }
    }

    /// The number, if this is one.
    pub(crate) fn as_number(&self) -> Option<&Number> {
        match self {
            View::Number(n) => Some(n),
            _ => None,
        }
    }

    /// Whether this is an object.
    pub(crate) fn is_object(&self) -> bool {
        matches!(self, View::Object(_))
    }
}

impl<'de> de::Deserialize<'de> for View<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ViewVisitor)
    }
}

struct ViewVisitor;

impl<'de> Visitor<'de> for ViewVisitor {
    type Value = View<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<View<'de>, E> {
        Ok(View::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<View<'de>, E> {
        Ok(View::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<View<'de>, E> {
        Ok(View::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<View<'de>, E> {
        Ok(Number::from_f64(v).map_or(View::Null, View::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<View<'de>, E> {
        Ok(View::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<View<'de>, E> {
        Ok(View::String(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<View<'de>, E> {
        Ok(View::String(Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<View<'de>, E> {
        Ok(View::Null)
    }

    fn visit_none<E>(self) -> Result<View<'de>, E> {
        Ok(View::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<View<'de>, D::Error> {
        de::Deserialize::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<View<'de>, A::Error> {
        while seq.next_element_seed(Skip)?.is_some() {}
        Ok(View::Array)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<View<'de>, A::Error> {
        let mut members = Vec::new();
        while let Some(key) = map.next_key_seed(Key)? {
            match key {
                Some(key) => members.push((key, map.next_value()?)),
                None => map.next_value_seed(Skip)?,
            }
        }
        Ok(View::Object(members))
    }
}

/// A member's key: which of [`KEYS`] it is, if any (escapes already decoded).
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Option<&'static str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for Key {
    type Value = Option<&'static str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(KEYS.iter().copied().find(|k| *k == v))
    }
}

/// A value read through the same parser as any other (so it is checked the same way:
/// numbers in range, strings well formed) and dropped.
struct Skip;

impl<'de> DeserializeSeed<'de> for Skip {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Skip)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Key)?.is_some() {
            map.next_value_seed(Skip)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod props {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::*;

    /// What a `Value` looks like through the usage reader's eyes: objects with only the
    /// kept keys (the last of each), arrays without elements.
    fn seen(v: &Value) -> Value {
        match v {
            Value::Array(_) => Value::Array(Vec::new()),
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| KEYS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), seen(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// The same picture from a [`View`].
    fn from_view(v: &View<'_>) -> Value {
        match v {
            View::Null => Value::Null,
            View::Bool(b) => Value::Bool(*b),
            View::Number(n) => Value::Number(n.clone()),
            View::String(s) => Value::String(s.to_string()),
            View::Array => Value::Array(Vec::new()),
            View::Object(members) => {
                let mut m = Map::new();
                for (k, v) in members {
                    m.insert((*k).to_owned(), from_view(v));
                }
                Value::Object(m)
            }
        }
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(KEYS).prop_map(str::to_owned),
            "[a-z_]{1,8}",
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Applies `edits` to a JSON text: at each index, insert (0), drop (1) or replace (2)
    /// a byte with the edit's bytes. The damage the property tests of the usage readers
    /// make to valid answers.
    pub(crate) fn damage(t: &mut Vec<u8>, edits: Vec<(prop::sample::Index, u8, &'static [u8])>) {
        for (at, op, bytes) in edits {
            let i = at.index(t.len() + 1);
            match op {
                0 => {
                    t.splice(i..i, bytes.iter().copied());
                }
                1 if i < t.len() => {
                    t.remove(i);
                }
                _ if i < t.len() => {
                    t.splice(i..=i, bytes.iter().copied());
                }
                _ => {}
            }
        }
    }

    /// A JSON text, possibly damaged: bytes replaced, dropped or inserted from an
    /// alphabet that makes near-misses (escapes, huge numbers, invalid UTF-8, repeats).
    fn text() -> impl Strategy<Value = Vec<u8>> {
        let edit = (
            any::<prop::sample::Index>(),
            0u8..3,
            prop::sample::select(vec![
                &b"\""[..],
                b"\\",
                b"\\u0075",
                b"\\ud800",
                b"1e400",
                b"-0",
                b"\xff",
                b"\xc3\xa9",
                b"\x01",
                b",",
                b":",
                b"{",
                b"}",
                b"]",
                br#","usage":{"input_tokens":3}"#,
                br#","model":"m""#,
            ]),
        );
        (value(), any::<bool>(), prop::collection::vec(edit, 0..3)).prop_map(
            |(v, pretty, edits)| {
                let mut t = if pretty {
                    serde_json::to_vec_pretty(&v).unwrap()
                } else {
                    serde_json::to_vec(&v).unwrap()
                };
                damage(&mut t, edits);
                t
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The view accepts exactly what a whole `Value` parse accepts, and shows every
        /// kept member as the `Value` holds it.
        #[test]
        fn view_agrees_with_a_whole_value_parse(t in text()) {
            let whole = serde_json::from_slice::<Value>(&t);
            let view = View::parse(&t);
            prop_assert_eq!(whole.is_ok(), view.is_some(), "{}", String::from_utf8_lossy(&t));
            if let (Ok(whole), Some(view)) = (whole, view) {
                prop_assert_eq!(seen(&whole), from_view(&view));
            }
        }
    }

    #[test]
    fn escaped_keys_and_repeats_read_as_a_value_reads_them() {
        let t = br#"{"us\u0061ge":{"input_tokens":1},"content":[{"usage":{"input_tokens":9}}],"usage":{"input_tokens":2,"input_tokens":3},"model":"a\"b"}"#;
        let v = View::parse(t).unwrap();
        let usage = v.get("usage").unwrap();
        assert_eq!(
            usage.get("input_tokens").and_then(View::as_number),
            Some(&Number::from(3))
        );
        assert_eq!(v.get("model").and_then(View::as_str), Some("a\"b"));
        assert!(View::parse(br#"{"model":"m"} x"#).is_none());
        assert!(View::parse(br#"{"skipped":1e400,"model":"m"}"#).is_none());
    }
}
