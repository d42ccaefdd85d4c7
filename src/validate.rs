//! Request validation with field-level errors.
//!
//! ```
//! use palisade::validate::{Validate, Validator, from_json};
//! use palisade::{ErrorKind, FieldError};
//!
//! #[derive(Debug, serde::Deserialize)]
//! struct Message {
//!     role: String,
//!     content: String,
//! }
//!
//! #[derive(Debug, serde::Deserialize)]
//! struct ChatRequest {
//!     model: String,
//!     max_tokens: u32,
//!     messages: Vec<Message>,
//! }
//!
//! impl Validate for Message {
//!     fn validate(&self) -> Result<(), Vec<FieldError>> {
//!         let mut v = Validator::new();
//!         v.one_of("role", self.role.as_str(), &["user", "assistant"]);
//!         v.length("content", &self.content, 1, 100_000);
//!         v.finish()
//!     }
//! }
//!
//! impl Validate for ChatRequest {
//!     fn validate(&self) -> Result<(), Vec<FieldError>> {
//!         let mut v = Validator::new();
//!         v.length("model", &self.model, 1, 256);
//!         v.range("max_tokens", self.max_tokens, 1, 64_000);
//!         v.count("messages", self.messages.len(), 1, 1_000);
//!         v.each("messages", &self.messages);
//!         v.finish()
//!     }
//! }
//!
//! let body = br#"{"model": "claude", "max_tokens": 0,
//!                 "messages": [{"role": "system", "content": ""}]}"#;
//! let err = from_json::<ChatRequest>(body).unwrap_err();
//! assert_eq!(err.kind(), ErrorKind::InvalidRequest);
//! let fields: Vec<&str> = err.fields().iter().map(|f| f.field.as_str()).collect();
//! assert_eq!(fields, ["max_tokens", "messages[0].role", "messages[0].content"]);
//!
//! // A type error names its field too.
//! let err = from_json::<ChatRequest>(br#"{"model": 7}"#).unwrap_err();
//! assert_eq!(err.fields()[0].field, "model");
//! ```
//!
//! - [`Validate`]: a type checks itself and lists every problem as a
//!   [`FieldError`] (`messages[0].content: must not be empty`);
//! - [`Validator`]: collects problems with small helpers ([`required`](Validator::required),
//!   [`length`](Validator::length), [`range`](Validator::range),
//!   [`one_of`](Validator::one_of), [`nested`](Validator::nested),
//!   [`each`](Validator::each), ...);
//! - [`from_json`]: deserializes JSON with the path of the failing field in the message,
//!   then validates; every failure is a 400 [`Error`] listing the fields;
//! - `ValidatedJson<T>` (feature `axum`): an extractor doing the same, answering 400, 413
//!   (body too large) or 415 (not JSON) with the crate's error.

use std::fmt::Display;

use serde::de::DeserializeOwned;

use crate::error::{Error, FieldError};

/// A type that checks its own values.
pub trait Validate {
    /// `Ok(())`, or every problem found (not only the first).
    fn validate(&self) -> Result<(), Vec<FieldError>>;

    /// [`validate`](Validate::validate) as the crate's 400 [`Error`].
    fn validate_request(&self) -> Result<(), Error> {
        self.validate().map_err(Error::invalid_fields)
    }
}

impl<T: Validate> Validate for Box<T> {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        (**self).validate()
    }
}

impl<T: Validate> Validate for Option<T> {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        self.as_ref().map_or(Ok(()), Validate::validate)
    }
}

/// Collects field errors; every helper records a problem and returns `&mut Self`, so
/// checks chain.
#[derive(Debug, Clone, Default)]
#[must_use = "call finish() to get the result"]
pub struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a problem.
    pub fn error(&mut self, field: impl Into<String>, message: impl Into<String>) -> &mut Self {
        self.errors.push(FieldError::new(field, message));
        self
    }

    /// Records `message` unless `ok`.
    pub fn check(&mut self, ok: bool, field: &str, message: impl Into<String>) -> &mut Self {
        if !ok {
            self.error(field, message);
        }
        self
    }

    /// A value that must be present.
    pub fn required<T>(&mut self, field: &str, value: Option<&T>) -> &mut Self {
        self.check(value.is_some(), field, "is required")
    }

    /// A string that must not be empty or only whitespace.
    pub fn not_blank(&mut self, field: &str, value: &str) -> &mut Self {
        self.check(!value.trim().is_empty(), field, "must not be blank")
    }

    /// A string whose length in characters is within `min..=max`.
    pub fn length(&mut self, field: &str, value: &str, min: usize, max: usize) -> &mut Self {
        let n = value.chars().count();
        if n < min {
            if min == 1 {
                self.error(field, "must not be empty");
            } else {
                self.error(
                    field,
                    format!("must be at least {min} characters (got {n})"),
                );
            }
        } else if n > max {
            self.error(field, format!("must be at most {max} characters (got {n})"));
        }
        self
    }

    /// A number of items within `min..=max`.
    pub fn count(&mut self, field: &str, len: usize, min: usize, max: usize) -> &mut Self {
        if len < min {
            if min == 1 {
                self.error(field, "must not be empty");
            } else {
                self.error(field, format!("must have at least {min} items (got {len})"));
            }
        } else if len > max {
            self.error(field, format!("must have at most {max} items (got {len})"));
        }
        self
    }

    /// A value within `min..=max`.
    pub fn range<T: PartialOrd + Display>(
        &mut self,
        field: &str,
        value: T,
        min: T,
        max: T,
    ) -> &mut Self {
        if value < min || value > max {
            self.error(
                field,
                format!("must be between {min} and {max} (got {value})"),
            );
        }
        self
    }

    /// A value at least `min`.
    pub fn min<T: PartialOrd + Display>(&mut self, field: &str, value: T, min: T) -> &mut Self {
        if value < min {
            self.error(field, format!("must be at least {min} (got {value})"));
        }
        self
    }

    /// A value at most `max`.
    pub fn max<T: PartialOrd + Display>(&mut self, field: &str, value: T, max: T) -> &mut Self {
        if value > max {
            self.error(field, format!("must be at most {max} (got {value})"));
        }
        self
    }

    /// A value that must be one of `allowed`.
    pub fn one_of<T: PartialEq + Display>(
        &mut self,
        field: &str,
        value: T,
        allowed: &[T],
    ) -> &mut Self {
        if !allowed.contains(&value) {
            let list: Vec<String> = allowed.iter().map(|a| format!("`{a}`")).collect();
            self.error(
                field,
                format!("must be one of {} (got `{value}`)", list.join(", ")),
            );
        }
        self
    }

    /// A string made only of ASCII letters, digits and the characters in `extra` (for
    /// ids, model names, tags), without patterns.
    pub fn charset(&mut self, field: &str, value: &str, extra: &str) -> &mut Self {
        match value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || extra.contains(*c)))
        {
            Some(bad) => self.error(
                field,
                format!("must hold only letters, digits and `{extra}` (found {bad:?})"),
            ),
            None => self,
        }
    }

    /// Validates a nested value; its fields are reported as `field.inner`.
    pub fn nested<V: Validate + ?Sized>(&mut self, field: &str, value: &V) -> &mut Self {
        if let Err(errors) = value.validate() {
            self.absorb(field, errors);
        }
        self
    }

    /// Validates every item; fields are reported as `field[i].inner`.
    pub fn each<V: Validate>(&mut self, field: &str, items: &[V]) -> &mut Self {
        for (i, item) in items.iter().enumerate() {
            if let Err(errors) = item.validate() {
                self.absorb(&format!("{field}[{i}]"), errors);
            }
        }
        self
    }

    fn absorb(&mut self, prefix: &str, errors: Vec<FieldError>) {
        for e in errors {
            let field = if e.field.is_empty() {
                prefix.to_owned()
            } else if e.field.starts_with('[') {
                format!("{prefix}{}", e.field)
            } else {
                format!("{prefix}.{}", e.field)
            };
            self.errors.push(FieldError::new(field, e.message));
        }
    }

    /// The problems so far.
    pub fn errors(&self) -> &[FieldError] {
        &self.errors
    }

    /// `Ok(())` when nothing was recorded, else every problem.
    pub fn finish(self) -> Result<(), Vec<FieldError>> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors)
        }
    }

    /// [`finish`](Self::finish) as the crate's 400 [`Error`].
    pub fn into_result(self) -> Result<(), Error> {
        self.finish().map_err(Error::invalid_fields)
    }
}

/// Deserializes `body` as JSON into `T`, then validates it.
///
/// A syntax error, a missing field or a value of the wrong type is a 400 whose field is
/// the path of the problem (`messages[0].content`, or `body` for the document as a
/// whole); validation problems are listed all together.
pub fn from_json<T: DeserializeOwned + Validate>(body: &[u8]) -> Result<T, Error> {
    let value = deserialize_json::<T>(body)?;
    value.validate_request()?;
    Ok(value)
}

/// Deserializes JSON with the failing field's path in the error, without validating.
pub fn deserialize_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    // The paths cost a little on every field; they only describe a failure, so a body is
    // parsed plainly first and again, with paths, only when that fails.
    match serde_json::from_slice(body) {
        Ok(value) => Ok(value),
        Err(_) => deserialize_json_with_paths(body),
    }
}

/// [`deserialize_json`] tracking the path of every field, to name the failing one.
fn deserialize_json_with_paths<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        // A broken document has no meaningful field; a wrong value does.
        let broken = err.inner().is_syntax() || err.inner().is_eof();
        let field = if broken || path == "." {
            "body".to_owned()
        } else {
            path
        };
        Error::invalid_fields([FieldError::new(field, err.inner().to_string())])
    })?;
    de.end()
        .map_err(|err| Error::invalid_fields([FieldError::new("body", err.to_string())]))?;
    Ok(value)
}

#[cfg(feature = "axum")]
pub use self::axum_support::ValidatedJson;

#[cfg(feature = "axum")]
mod axum_support {
    use axum::extract::{FromRequest, Request};
    use bytes::Bytes;
    use http::header::CONTENT_TYPE;
    use serde::de::DeserializeOwned;

    use super::{Validate, from_json};
    use crate::error::{Error, ErrorFormat, ErrorKind};

    /// An axum extractor: JSON that was deserialized and validated.
    ///
    /// Refuses with the crate's [`Error`]: 415 when the content type is not JSON
    /// (`application/json` or any `+json` type), 413 when the body is over axum's body
    /// limit (`DefaultBodyLimit`), and 400 listing the fields otherwise. The error is
    /// rendered in the [`ErrorFormat`] found in the request extensions, if a layer put one
    /// there, else the default.
    ///
    /// ```
    /// use axum::{Router, routing::post};
    /// use palisade::validate::{Validate, ValidatedJson, Validator};
    /// use palisade::FieldError;
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Count { n: u32 }
    ///
    /// impl Validate for Count {
    ///     fn validate(&self) -> Result<(), Vec<FieldError>> {
    ///         let mut v = Validator::new();
    ///         v.range("n", self.n, 1, 10);
    ///         v.finish()
    ///     }
    /// }
    ///
    /// async fn handler(ValidatedJson(count): ValidatedJson<Count>) -> String {
    ///     count.n.to_string()
    /// }
    ///
    /// let app: Router = Router::new().route("/count", post(handler));
    /// # let _ = app;
    /// ```
    #[derive(Debug, Clone, Copy, Default)]
    #[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
    pub struct ValidatedJson<T>(pub T);

    fn is_json(content_type: &str) -> bool {
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
    }

    impl<S, T> FromRequest<S> for ValidatedJson<T>
    where
        S: Send + Sync,
        T: DeserializeOwned + Validate,
    {
        type Rejection = Error;

        async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
            let format = req.extensions().get::<ErrorFormat>().copied();
            let with_format = |err: Error| match format {
                Some(f) => err.with_format(f),
                None => err,
            };
            let content_type = req
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if !is_json(content_type) {
                return Err(with_format(Error::new(
                    ErrorKind::UnsupportedMediaType,
                    "expected a JSON body with `content-type: application/json`",
                )));
            }
            let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
                with_format(
                    if rejection.status() == http::StatusCode::PAYLOAD_TOO_LARGE {
                        Error::new(
                            ErrorKind::PayloadTooLarge,
                            "the request body is larger than this endpoint accepts",
                        )
                    } else {
                        Error::invalid_request(rejection.body_text())
                    },
                )
            })?;
            from_json(&bytes).map(ValidatedJson).map_err(with_format)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::is_json;

        #[test]
        fn json_content_types() {
            assert!(is_json("application/json"));
            assert!(is_json("Application/JSON; charset=utf-8"));
            assert!(is_json("application/problem+json"));
            assert!(!is_json("text/plain"));
            assert!(!is_json("application/jsonx"));
            assert!(!is_json(""));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[derive(Debug, serde::Deserialize)]
    struct Inner {
        name: String,
    }

    impl Validate for Inner {
        fn validate(&self) -> Result<(), Vec<FieldError>> {
            let mut v = Validator::new();
            v.not_blank("name", &self.name);
            v.finish()
        }
    }

    #[derive(Debug, serde::Deserialize)]
    struct Outer {
        kind: String,
        temperature: f64,
        tags: Vec<String>,
        inner: Inner,
        items: Vec<Inner>,
        limit: Option<u32>,
    }

    impl Validate for Outer {
        fn validate(&self) -> Result<(), Vec<FieldError>> {
            let mut v = Validator::new();
            v.one_of("kind", self.kind.as_str(), &["a", "b"])
                .range("temperature", self.temperature, 0.0, 1.0)
                .count("tags", self.tags.len(), 1, 2)
                .required("limit", self.limit.as_ref())
                .nested("inner", &self.inner)
                .each("items", &self.items);
            for (i, tag) in self.tags.iter().enumerate() {
                v.charset(&format!("tags[{i}]"), tag, "-_");
            }
            v.finish()
        }
    }

    #[test]
    fn collects_every_problem_with_paths() {
        let body = br#"{"kind": "c", "temperature": 1.5, "tags": ["ok", "no way", "x"],
                        "inner": {"name": " "}, "items": [{"name": "a"}, {"name": ""}],
                        "limit": null}"#;
        let err = from_json::<Outer>(body).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidRequest);
        let got: Vec<String> = err.fields().iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "kind: must be one of `a`, `b` (got `c`)",
                "temperature: must be between 0 and 1 (got 1.5)",
                "tags: must have at most 2 items (got 3)",
                "limit: is required",
                "inner.name: must not be blank",
                "items[1].name: must not be blank",
                "tags[1]: must hold only letters, digits and `-_` (found ' ')",
            ]
        );
        let ok = br#"{"kind": "a", "temperature": 0.5, "tags": ["t"], "inner": {"name": "n"},
                      "items": [], "limit": 3}"#;
        assert!(from_json::<Outer>(ok).is_ok());
    }

    #[test]
    fn deserialization_errors_name_the_field() {
        let err = from_json::<Outer>(br#"{"kind": "a", "temperature": "hot"}"#).unwrap_err();
        assert_eq!(err.fields()[0].field, "temperature");
        assert!(err.fields()[0].message.contains("expected f64"), "{err}");

        let err = from_json::<Outer>(
            br#"{"kind": "a", "temperature": 0, "tags": [], "inner": {"name": "x"},
                 "items": [{"name": 5}], "limit": 1}"#,
        )
        .unwrap_err();
        assert_eq!(err.fields()[0].field, "items[0].name");

        let err = from_json::<Outer>(br#"{"kind": "a""#).unwrap_err();
        assert_eq!(err.fields()[0].field, "body");
        let err = from_json::<Inner>(br#"{"name": "a"} trailing"#).unwrap_err();
        assert_eq!(err.fields()[0].field, "body");
        let err = from_json::<Inner>(br#"{}"#).unwrap_err();
        assert!(
            err.fields()[0].message.contains("missing field `name`"),
            "{err}"
        );
    }

    /// A JSON-like document of `Outer`'s members: well-formed or not, values of the
    /// right type or not, cut short or followed by more bytes.
    fn outer_document() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let key = prop_oneof![
            Just("kind"),
            Just("temperature"),
            Just("tags"),
            Just("inner"),
            Just("items"),
            Just("limit"),
            Just("other"),
        ];
        let value = prop_oneof![
            Just("null"),
            Just("0.5"),
            Just("3"),
            Just("-1"),
            Just("1e400"),
            Just(r#""a""#),
            Just(r#""""#),
            Just("true"),
            Just("[]"),
            Just("{}"),
            Just(r#"{"name":"n"}"#),
            Just(r#"{"name":5}"#),
            Just(r#"[{"name":"x"},{"name":""}]"#),
            Just(r#"["t","u v"]"#),
            Just("[1,"),
        ];
        let members = proptest::collection::vec((key, value), 0..9);
        (members, proptest::option::of(0usize..120), "[ }x,]{0,2}").prop_map(
            |(members, cut, tail)| {
                let inner: Vec<String> = members
                    .iter()
                    .map(|(k, v)| format!(r#""{k}":{v}"#))
                    .collect();
                let mut doc = format!("{{{}}}{tail}", inner.join(",")).into_bytes();
                if let Some(cut) = cut {
                    doc.truncate(cut);
                }
                doc
            },
        )
    }

    /// The outcome of a deserialization, comparable.
    fn outcome<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
        match r {
            Ok(v) => format!("ok {v:?}"),
            Err(e) => format!("err {e} {:?}", e.fields()),
        }
    }

    proptest::proptest! {
        /// The plain parse tried first gives the same answers as the parse with paths.
        #[test]
        fn deserialize_json_agrees_with_the_parse_with_paths(doc in outer_document()) {
            proptest::prop_assert_eq!(
                outcome(deserialize_json::<Outer>(&doc)),
                outcome(deserialize_json_with_paths::<Outer>(&doc))
            );
        }

        /// The same on well-formed documents of the right types (which both accept).
        #[test]
        fn deserialize_json_agrees_on_well_formed_documents(
            kind in "[ab ]{0,2}",
            temperature in -2.0f64..2.0,
            tags in proptest::collection::vec("[a-z -]{0,3}", 0..3),
            names in proptest::collection::vec("[a-z ]{0,2}", 1..4),
            limit in proptest::option::of(proptest::prelude::any::<u32>()),
        ) {
            let items: Vec<_> = names.iter().map(|n| serde_json::json!({"name": n})).collect();
            let doc = serde_json::to_vec(&serde_json::json!({
                "kind": kind, "temperature": temperature, "tags": tags,
                "inner": {"name": names[0]}, "items": items, "limit": limit,
            }))
            .expect("a JSON value encodes");
            let fast = outcome(deserialize_json::<Outer>(&doc));
            proptest::prop_assert!(fast.starts_with("ok "), "{}", fast);
            proptest::prop_assert_eq!(fast, outcome(deserialize_json_with_paths::<Outer>(&doc)));
        }

        /// The same on arbitrary bytes.
        #[test]
        fn deserialize_json_agrees_on_any_bytes(
            doc in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..48)
        ) {
            proptest::prop_assert_eq!(
                outcome(deserialize_json::<Inner>(&doc)),
                outcome(deserialize_json_with_paths::<Inner>(&doc))
            );
        }
    }

    #[test]
    fn helpers_report_and_pass() {
        let mut v = Validator::new();
        v.length("a", "", 1, 3)
            .length("b", "abcd", 1, 3)
            .length("c", "ab", 3, 5)
            .length("d", "héé", 1, 3)
            .min("e", 0, 1)
            .max("f", 9, 8)
            .count("g", 0, 1, 2)
            .count("h", 1, 2, 3)
            .check(false, "i", "custom")
            .error("j", "direct");
        assert_eq!(v.errors().len(), 9);
        let fields: Vec<&str> = v.errors().iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["a", "b", "c", "e", "f", "g", "h", "i", "j"]);
        let err = v.into_result().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidRequest);
        assert!(Validator::new().finish().is_ok());
        assert!(Validator::new().into_result().is_ok());
    }

    #[test]
    fn option_and_box_delegate() {
        let none: Option<Inner> = None;
        assert!(none.validate().is_ok());
        let bad = Some(Inner {
            name: String::new(),
        });
        assert!(bad.validate().is_err());
        let boxed = Box::new(Inner { name: "x".into() });
        assert!(boxed.validate().is_ok());
        let err = bad.validate_request().unwrap_err();
        assert_eq!(err.fields()[0].field, "name");
        let mut v = Validator::new();
        v.nested("outer", &bad);
        assert_eq!(v.errors()[0].field, "outer.name");
    }
}
