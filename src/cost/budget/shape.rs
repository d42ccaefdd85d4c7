//! The JSON types of the fields the estimate reads, read to say which one it could not
//! read. Only those fields, and only the first few levels, are read; the rest is skipped
//! without recursion and without reading its numbers, so no body is nested too deeply to
//! be judged (serde_json refuses to read more than 128 levels into a map of values), and
//! a number no type holds (`1e400`) elsewhere does not stop it.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The fields the estimate reads, at the top of a body or in a tool.
pub(super) static FIELDS: [&str; 9] = [
    "model",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "tools",
    "type",
    "max_uses",
    "max_content_tokens",
];

/// The type of a JSON value, with its items down to the depth it was read at.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Shape {
    Null,
    /// A whole number from 0 to `u64::MAX`.
    Whole,
    Text,
    /// A boolean, or a number that is negative, fractional or too large.
    Other,
    /// A list, and whether every item is a tool object whose fields the estimate reads
    /// have the right types (known when read above the depth limit). The items are
    /// judged as they are read, never kept: a list of a million takes no more memory than
    /// one.
    List {
        tools: bool,
    },
    /// An object; its fields when read above the depth limit (a key given twice keeps
    /// its last value, as `serde_json::Map` does).
    Object(HashMap<String, Shape>),
}

impl Shape {
    /// The shape of a whole JSON text, its containers read `depth` levels down (of the
    /// top object, only the fields `keys`; below it, only [`FIELDS`]), or `None` when it
    /// is not JSON or a number read is one serde_json cannot hold (`1e400`).
    pub(super) fn of(body: &[u8], depth: u8, keys: &'static [&'static str]) -> Option<Shape> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let shape = Levels { depth, keys }.deserialize(&mut de).ok()?;
        de.end().ok()?;
        Some(shape)
    }

    /// Null or a whole number: a field that may be absent.
    pub(super) fn is_whole_or_null(&self) -> bool {
        matches!(self, Shape::Null | Shape::Whole)
    }

    /// An object with a string (or null) `type`, and whole numbers (or null) for
    /// `max_uses` and `max_content_tokens`.
    fn is_tool(&self) -> bool {
        let Shape::Object(fields) = self else {
            return false;
        };
        fields
            .get("type")
            .is_none_or(|v| matches!(v, Shape::Null | Shape::Text))
            && ["max_uses", "max_content_tokens"]
                .iter()
                .all(|f| fields.get(*f).is_none_or(Shape::is_whole_or_null))
    }
}

/// Reads a value's shape, keeping the items of containers `depth` levels down, and of
/// an object only the fields `keys`.
#[derive(Clone, Copy)]
struct Levels {
    depth: u8,
    keys: &'static [&'static str],
}

impl<'de> DeserializeSeed<'de> for Levels {
    type Value = Shape;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Shape, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Levels {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_i64<E>(self, v: i64) -> Result<Shape, E> {
        Ok(if v >= 0 { Shape::Whole } else { Shape::Other })
    }
    fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Whole)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::Text)
    }
    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape::Null)
    }
    fn visit_none<E>(self) -> Result<Shape, E> {
        Ok(Shape::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        let mut tools = true;
        match self.depth.checked_sub(1) {
            Some(depth) => {
                let below = Levels {
                    depth,
                    keys: &FIELDS,
                };
                while let Some(item) = seq.next_element_seed(below)? {
                    tools &= item.is_tool();
                }
            }
            None => {
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    tools = false;
                }
            }
        }
        Ok(Shape::List { tools })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut fields = HashMap::new();
        match self.depth.checked_sub(1) {
            Some(depth) => {
                let below = Levels {
                    depth,
                    keys: &FIELDS,
                };
                while let Some(key) = map.next_key::<String>()? {
                    if self.keys.contains(&key.as_str()) {
                        let value = map.next_value_seed(below)?;
                        fields.insert(key, value);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            None => while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {},
        }
        Ok(Shape::Object(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_types_and_skips_what_lies_below_the_depth() {
        let deep = format!("{}1{}", "[".repeat(1000), "]".repeat(1000));
        let body = format!(
            r#"{{"a":1,"b":-1,"c":1.5,"d":"x","e":null,"f":[true,{deep}],"a":2,
                "g":[{{"type":"t","max_uses":1,"max_content_tokens":null,"x":{deep},"y":1e400}},{{}}],
                "h":[],"i":[{{"max_uses":-1}}],"j":1e400}}"#
        );
        static KEYS: [&str; 9] = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
        let Some(Shape::Object(top)) = Shape::of(body.as_bytes(), 3, &KEYS) else {
            panic!("an object")
        };
        assert!(!top.contains_key("j"));
        assert_eq!(top["a"], Shape::Whole);
        assert_eq!(top["b"], Shape::Other);
        assert_eq!(top["c"], Shape::Other);
        assert_eq!(top["d"], Shape::Text);
        assert_eq!(top["e"], Shape::Null);
        assert_eq!(top["f"], Shape::List { tools: false });
        assert_eq!(top["g"], Shape::List { tools: true });
        assert_eq!(top["h"], Shape::List { tools: true });
        assert_eq!(top["i"], Shape::List { tools: false });
        assert_eq!(Shape::of(b"{} x", 2, &KEYS), None);
        assert_eq!(Shape::of(b"not json", 2, &KEYS), None);
        assert_eq!(Shape::of(br#"{"a":1e400}"#, 2, &KEYS), None);
        assert_eq!(
            Shape::of(b"18446744073709551616", 0, &KEYS),
            Some(Shape::Other)
        );
    }
}
