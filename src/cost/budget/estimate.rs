//! What a request may cost at most, before it is sent.

use std::borrow::Cow;

use serde::Deserialize;

use crate::cost::json_fast;
use crate::cost::pricing::{Money, PriceTable};
use crate::cost::usage::Usage;

/// The most a request may cost, set in the request extensions by an earlier layer or
/// handler that knows better than the body (for example after counting tokens).
/// [`BudgetLayer`](super::BudgetLayer) reserves it instead of reading the body.
///
/// ```
/// use palisade::cost::budget::BudgetEstimate;
/// use palisade::cost::Money;
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(BudgetEstimate(Money::parse_dollars("0.25").unwrap()));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetEstimate(pub Money);

/// The fields of an Anthropic Messages or OpenAI chat request that bound its cost.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    /// OpenAI's number of choices, each up to the output limit, all billed.
    #[serde(default)]
    n: Option<u64>,
    /// The tools, for the server-side web searches they allow (billed per search).
    #[serde(borrow, default)]
    tools: Option<Vec<Tool<'a>>>,
}

/// A tool of the request, as far as its price goes.
#[derive(Deserialize)]
struct Tool<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    /// The most searches a web search tool may run (Anthropic's `max_uses`).
    #[serde(default)]
    max_uses: Option<u64>,
}

/// The most web searches the tools allow: the `max_uses` of each web search tool (one
/// without `max_uses` is bounded by the model alone, and reserves nothing).
fn searches(tools: Option<&[Tool<'_>]>) -> u64 {
    tools
        .unwrap_or_default()
        .iter()
        .filter_map(|t| search_uses(t.kind.as_deref(), t.max_uses))
        .fold(0, u64::saturating_add)
}

/// The searches one tool of type `kind` allows: its `max_uses` when it is a web search.
fn search_uses(kind: Option<&str>, max_uses: Option<u64>) -> Option<u64> {
    max_uses.filter(|_| kind.is_some_and(|k| k.starts_with("web_search")))
}

/// What the estimate needs from a body: its [`Head`] boiled down.
#[derive(Debug, PartialEq, Eq)]
struct Bounds<'a> {
    model: Option<Cow<'a, str>>,
    /// `max_tokens`, `max_completion_tokens`, `max_output_tokens`.
    limits: [Option<u64>; 3],
    n: Option<u64>,
    searches: u64,
}

impl<'a> From<Head<'a>> for Bounds<'a> {
    fn from(head: Head<'a>) -> Self {
        Self {
            searches: searches(head.tools.as_deref()),
            model: head.model,
            limits: [
                head.max_tokens,
                head.max_completion_tokens,
                head.max_output_tokens,
            ],
            n: head.n,
        }
    }
}

/// What the body says about a request's worst cost.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Estimate {
    /// Not a JSON object naming a model: no LLM call, no budget.
    NotMetered,
    /// The model has no price.
    Unpriced(String),
    /// A JSON object naming a model whose cost-bounding fields cannot be read (a field
    /// given twice, an output limit that is not a whole number): refused, never passed
    /// unchecked.
    Invalid { field: &'static str, reason: String },
    /// The most it may cost.
    Cost { model: String, max: Money },
}

/// The byte-order mark some clients put before a UTF-8 text.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Estimates from a JSON body: input tokens as `ceil(len / bytes_per_token)` priced at the
/// dearest input rate (plain or cache write), plus the output limit (the largest one given)
/// at the output price for each of the `n` choices asked for, plus the web searches its
/// tools allow (`max_uses`) at the model's price per search.
///
/// A body opening with a UTF-8 byte-order mark is read as the JSON after it (as lenient
/// JSON readers do, so an upstream may well accept it): it is estimated as that JSON alone.
pub(crate) fn estimate(
    body: &[u8],
    prices: &PriceTable,
    bytes_per_token: u64,
    default_max_tokens: u64,
) -> Estimate {
    let body = body.strip_prefix(BOM).unwrap_or(body);
    let bounds = match scan(body) {
        Some(bounds) => bounds,
        None => match serde_json::from_slice::<Head<'_>>(body) {
            Ok(head) => Bounds::from(head),
            Err(e) => return unreadable(body, &e),
        },
    };
    priced(bounds, body, prices, bytes_per_token, default_max_tokens)
}

/// [`estimate`] through serde alone, which the fast [`scan`] must agree with.
#[cfg(test)]
fn estimate_serde(
    body: &[u8],
    prices: &PriceTable,
    bytes_per_token: u64,
    default_max_tokens: u64,
) -> Estimate {
    let body = body.strip_prefix(BOM).unwrap_or(body);
    match serde_json::from_slice::<Head<'_>>(body) {
        Ok(head) => priced(
            Bounds::from(head),
            body,
            prices,
            bytes_per_token,
            default_max_tokens,
        ),
        Err(e) => unreadable(body, &e),
    }
}

fn priced(
    bounds: Bounds<'_>,
    body: &[u8],
    prices: &PriceTable,
    bytes_per_token: u64,
    default_max_tokens: u64,
) -> Estimate {
    let Some(model) = bounds.model else {
        return Estimate::NotMetered;
    };
    let Some(price) = prices.get(&model) else {
        return Estimate::Unpriced(model.into_owned());
    };
    let output = bounds
        .limits
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(default_max_tokens)
        .saturating_mul(bounds.n.unwrap_or(1).max(1));
    let input = (body.len() as u64).div_ceil(bytes_per_token.max(1));
    let web_search_requests = bounds.searches;
    let as_plain = Usage {
        input_tokens: input,
        output_tokens: output,
        web_search_requests,
        ..Usage::default()
    };
    let as_5m = Usage {
        cache_write_5m_tokens: input,
        output_tokens: output,
        web_search_requests,
        ..Usage::default()
    };
    let as_1h = Usage {
        cache_write_1h_tokens: input,
        output_tokens: output,
        web_search_requests,
        ..Usage::default()
    };
    let max = [as_plain, as_5m, as_1h]
        .iter()
        .map(|u| price.cost(u))
        .max()
        .unwrap_or(Money::ZERO);
    Estimate::Cost {
        model: model.into_owned(),
        max,
    }
}

/// The [`Bounds`] of a body read by a scan of its top-level members, over the crate's fast
/// JSON reader ([`json_fast::skip`]) for the members it does not read, when the scan can
/// vouch that serde reads the same; `None` (serde decides) for anything else: a body that
/// is not a JSON object, a member given twice, an escaped key or string among those read,
/// a limit that is not a plain whole number, a tool that is not an object, and whatever
/// the fast reader leaves to serde.
fn scan(body: &[u8]) -> Option<Bounds<'_>> {
    let mut s = Scan { b: body, i: 0 };
    s.ws();
    let mut bounds = Bounds {
        model: None,
        limits: [None; 3],
        n: None,
        searches: 0,
    };
    let mut seen = 0u8;
    s.members(|s, key| {
        let (bit, at) = match key {
            b"model" => (0, None),
            b"max_tokens" => (1, Some(0)),
            b"max_completion_tokens" => (2, Some(1)),
            b"max_output_tokens" => (3, Some(2)),
            b"n" => (4, None),
            b"tools" => (5, None),
            _ => return s.skip(1),
        };
        if seen & (1 << bit) != 0 {
            return None; // given twice: serde names the field
        }
        seen |= 1 << bit;
        match (bit, at) {
            (0, _) => bounds.model = s.string_or_null()?.map(Cow::Borrowed),
            (_, Some(at)) => bounds.limits[at] = s.whole_or_null()?,
            (4, _) => bounds.n = s.whole_or_null()?,
            _ => bounds.searches = s.tools()?,
        }
        Some(())
    })?;
    s.ws();
    (s.i == s.b.len()).then_some(bounds)
}

/// The scan's place in a body.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// Passes a value `depth` levels deep, checked by the fast reader.
    fn skip(&mut self, depth: u32) -> Option<()> {
        self.i = json_fast::skip(self.b, self.i, depth)?;
        Some(())
    }

    /// The text of the value here, checked and passed.
    fn token(&mut self) -> Option<&'a [u8]> {
        let start = self.i;
        self.skip(1)?;
        Some(&self.b[start..self.i])
    }

    /// The members of the object here, each key (unescaped) handed
    /// to `member` with the scan at its value.
    fn members(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        if self.peek()? != b'{' {
            return None;
        }
        self.i += 1;
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
            let key = self.token()?;
            let key = &key[1..key.len() - 1];
            if key.contains(&b'\\') {
                return None; // an escaped key may name a field
            }
            self.ws();
            if self.peek()? != b':' {
                return None;
            }
            self.i += 1;
            self.ws();
            member(self, key)?;
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

    /// A string without escapes, or `null`.
    fn string_or_null(&mut self) -> Option<Option<&'a str>> {
        let t = self.token()?;
        match t {
            b"null" => Some(None),
            [b'"', text @ .., b'"'] if !text.contains(&b'\\') => {
                std::str::from_utf8(text).ok().map(Some)
            }
            _ => None,
        }
    }

    /// A whole number of at most 19 digits, or `null`.
    fn whole_or_null(&mut self) -> Option<Option<u64>> {
        let t = self.token()?;
        if t == b"null" {
            return Some(None);
        }
        if t.is_empty() || t.len() > 19 || !t.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(Some(
            t.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
        ))
    }

    /// The searches the `tools` allow: a list of objects, or `null`.
    fn tools(&mut self) -> Option<u64> {
        match self.peek()? {
            b'n' => (self.token()? == b"null").then_some(0),
            b'[' => {
                self.i += 1;
                let mut total = 0u64;
                self.ws();
                if self.peek()? == b']' {
                    self.i += 1;
                    return Some(0);
                }
                loop {
                    self.ws();
                    total = total.saturating_add(self.tool()?);
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Some(total);
                        }
                        _ => return None,
                    }
                }
            }
            _ => None,
        }
    }

    /// The searches one tool allows.
    fn tool(&mut self) -> Option<u64> {
        let (mut kind, mut max_uses) = (None, None);
        let mut seen = 0u8;
        self.members(|s, key| {
            let bit = match key {
                b"type" => 0,
                b"max_uses" => 1,
                _ => return s.skip(3),
            };
            if seen & (1 << bit) != 0 {
                return None;
            }
            seen |= 1 << bit;
            if bit == 0 {
                kind = s.string_or_null()?;
            } else {
                max_uses = s.whole_or_null()?;
            }
            Some(())
        })?;
        Some(search_uses(kind, max_uses).unwrap_or(0))
    }
}

const LIMITS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// Why a body the estimate could not read is refused, or `NotMetered` when it is not a
/// JSON object naming a model at all.
fn unreadable(body: &[u8], e: &serde_json::Error) -> Estimate {
    let Ok(map) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) else {
        return Estimate::NotMetered;
    };
    if !map.contains_key("model") {
        return Estimate::NotMetered;
    }
    if !map["model"].is_string() {
        return Estimate::Invalid {
            field: "model",
            reason: "must be a string".to_owned(),
        };
    }
    if let Some(field) = LIMITS
        .into_iter()
        .find(|f| map.get(*f).is_some_and(|v| !v.is_null() && !v.is_u64()))
    {
        return Estimate::Invalid {
            field,
            reason: "must be a whole number of tokens, 0 or more".to_owned(),
        };
    }
    if map.get("n").is_some_and(|v| !v.is_null() && !v.is_u64()) {
        return Estimate::Invalid {
            field: "n",
            reason: "must be a whole number of choices".to_owned(),
        };
    }
    let tool_ok = |t: &serde_json::Value| {
        t.as_object().is_some_and(|t| {
            t.get("type").is_none_or(|v| v.is_null() || v.is_string())
                && t.get("max_uses").is_none_or(|v| v.is_null() || v.is_u64())
        })
    };
    if map.get("tools").is_some_and(|v| {
        !v.is_null() && !v.as_array().is_some_and(|tools| tools.iter().all(tool_ok))
    }) {
        return Estimate::Invalid {
            field: "tools",
            reason: "must be a list of tools, each with a string type and a whole max_uses"
                .to_owned(),
        };
    }
    // The types are right, so a field is given twice.
    let msg = e.to_string();
    let field = std::iter::once("model")
        .chain(LIMITS)
        .chain(["n", "tools"])
        .find(|f| msg.contains(&format!("`{f}`")))
        .unwrap_or("model");
    Estimate::Invalid {
        field,
        reason: "is given more than once".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn reserves_the_output_limit_and_the_dearest_input_rate() {
        let table = PriceTable::builtin();
        let body = br#"{"model":"claude-3-7-sonnet-20250219","max_tokens":1000}"#;
        let Estimate::Cost { model, max } = estimate(body, &table, 4, 4096) else {
            panic!("expected a cost")
        };
        assert_eq!(model, "claude-3-7-sonnet-20250219");
        // 1000 × $15/Mtok + ceil(56/4) = 14 input tokens × $6/Mtok (1-hour cache write)
        assert_eq!(max, Money::from_picos(1000 * 15_000_000 + 14 * 6_000_000));
    }

    #[test]
    fn openai_limits_and_defaults() {
        let table = PriceTable::builtin();
        let Estimate::Cost { max, .. } = estimate(
            br#"{"model":"gpt-4o","max_completion_tokens":10}"#,
            &table,
            1_000_000,
            7,
        ) else {
            panic!()
        };
        let Estimate::Cost { max: dflt, .. } =
            estimate(br#"{"model":"gpt-4o"}"#, &table, 1_000_000, 10)
        else {
            panic!()
        };
        assert_eq!(max, dflt);
    }

    #[test]
    fn bodies_without_a_model_are_not_metered_and_unknown_models_are_named() {
        let table = PriceTable::builtin();
        assert_eq!(estimate(b"not json", &table, 4, 1), Estimate::NotMetered);
        assert_eq!(
            estimate(br#"{"name":"bot"}"#, &table, 4, 1),
            Estimate::NotMetered
        );
        assert_eq!(
            estimate(br#"{"model":"my-model"}"#, &table, 4, 1),
            Estimate::Unpriced("my-model".into())
        );
    }

    /// Request bodies as clients send them: both APIs, tools, choices, escapes and
    /// non-ASCII text, nulls, spacing.
    fn real_bodies() -> Vec<Vec<u8>> {
        let text = "Résumé: a \"quoted\" line,\n\ta tab, a slash / and 表 — ".repeat(8);
        let bodies = [
            serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 1024,
                "system": "You are a concise assistant.",
                "messages": [{"role": "user", "content": text}]}),
            serde_json::json!({"model": "claude-3-7-sonnet-20250219", "max_tokens": 1000,
                "stream": true, "temperature": 0.7, "stop_sequences": ["\n\nHuman:"],
                "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
                    {"name": "get_weather", "description": "Weather", "input_schema":
                        {"type": "object", "properties": {"city": {"type": "string"}}}}],
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
            serde_json::json!({"model": "gpt-4o", "max_completion_tokens": 300, "n": 3,
                "max_tokens": null, "tools": null, "user": "ann",
                "messages": [{"role": "system", "content": text}, {"role": "user", "content": "ok"}]}),
            serde_json::json!({"model": "gpt-4o-mini", "max_output_tokens": 64,
                "input": "hello", "metadata": {"a": [1, 2.5, -3e-2, true, false, null]}}),
            serde_json::json!({"model": "my-own-model", "max_tokens": 10, "messages": []}),
            serde_json::json!({"name": "a bot", "prompt": text}),
            serde_json::json!({"model": null, "max_tokens": 10}),
        ];
        let mut out: Vec<Vec<u8>> = bodies
            .iter()
            .flat_map(|b| {
                [
                    serde_json::to_vec(b).unwrap(),
                    serde_json::to_vec_pretty(b).unwrap(),
                ]
            })
            .collect();
        out.push(
            br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"system":"You are a concise assistant for a bot-builder platform.","messages":[{"role":"user","content":"Summarise the three main benefits of rate limiting an LLM gateway in one short paragraph."}]}"#
                .to_vec(),
        );
        out
    }

    /// Bytes replaced, dropped or inserted from an alphabet of near-misses for the fields
    /// the estimate reads.
    fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
        let edit = (
            any::<prop::sample::Index>(),
            0u8..3,
            prop::sample::select(vec![
                &b"\""[..],
                b"\\",
                b"\\u006d",
                b"\\ud800",
                b"1e400",
                b"1e2",
                b"1.0",
                b"-1",
                b"-0",
                b"0",
                b"01",
                b"18446744073709551616",
                b"9999999999999999999",
                b"null",
                b"true",
                b"\xff",
                b"\xc3\xa9",
                b"\x01",
                b" ",
                b"\xEF\xBB\xBF",
                b",",
                b":",
                b"{",
                b"}",
                b"[",
                b"]",
                br#","model":"gpt-4o""#,
                br#","model":"claude-sonnet-4-5""#,
                br#","max_tokens":7"#,
                br#","max_completion_tokens":70"#,
                br#","max_output_tokens":null"#,
                br#","n":2"#,
                br#","tools":[{"type":"web_search_1","max_uses":3}]"#,
                br#","tools":[]"#,
                br#"{"type":"web_search_2","max_uses":2,"type":null}"#,
                br#""max_uses":4,"#,
                br#""type":"web_search","#,
            ]),
        );
        prop::collection::vec(edit, 0..4).prop_map(move |edits| {
            let mut t = base.clone();
            crate::cost::json_view::props::damage(&mut t, edits);
            t
        })
    }

    /// Arbitrary bytes from JSON's alphabet and the fields' names.
    fn json_ish() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop::sample::select(vec![
            &b"{"[..],
            b"}",
            b"[",
            b"]",
            b":",
            b",",
            b" ",
            b"\"",
            b"\\",
            b"0",
            b"7",
            b"-",
            b".",
            b"e",
            b"null",
            b"\"model\"",
            b"\"gpt-4o\"",
            b"\"max_tokens\"",
            b"\"n\"",
            b"\"tools\"",
            b"\"type\"",
            b"\"web_search\"",
            b"\"max_uses\"",
            b"\xff",
            b"\x01",
        ]);
        prop::collection::vec(piece, 0..40).prop_map(|p| p.concat())
    }

    /// Objects of members picked from the fields' names and values of every kind, so that
    /// repeats, nulls and wrong types are common.
    fn members() -> impl Strategy<Value = Vec<u8>> {
        let key = prop::sample::select(vec![
            "model",
            "max_tokens",
            "max_completion_tokens",
            "max_output_tokens",
            "n",
            "tools",
            "messages",
            "type",
            "max_uses",
        ]);
        let value = prop::sample::select(vec![
            r#""gpt-4o""#,
            r#""claude-sonnet-4-5""#,
            r#""unpriced""#,
            r#""web_search_x""#,
            "null",
            "0",
            "12",
            "-3",
            "1.5",
            "1e3",
            "true",
            "[]",
            "{}",
            r#"[{"type":"web_search_1","max_uses":2},{"type":"x","max_uses":9}]"#,
            r#"[{"type":"web_search_1","max_uses":2,"max_uses":1}]"#,
            r#"[{"type":"web_search_1","max_uses":null},null]"#,
            r#"[{"type":3}]"#,
            r#"[{"role":"user","content":"hi"}]"#,
        ]);
        let space = prop::sample::select(vec!["", " ", "\n  "]);
        prop::collection::vec((key, value, space), 0..6).prop_map(|m| {
            let inner: Vec<String> = m
                .into_iter()
                .map(|(k, v, sp)| format!("{sp}\"{k}\":{sp}{v}"))
                .collect();
            format!("{{{}}}", inner.join(",")).into_bytes()
        })
    }

    fn check(t: &[u8]) -> Result<(), TestCaseError> {
        let table = PriceTable::builtin();
        prop_assert_eq!(
            estimate(t, &table, 3, 4096),
            estimate_serde(t, &table, 3, 4096),
            "{}",
            String::from_utf8_lossy(t)
        );
        if let Some(fast) = scan(t) {
            let serde = serde_json::from_slice::<Head<'_>>(t).map(Bounds::from);
            prop_assert_eq!(Some(fast), serde.ok(), "{}", String::from_utf8_lossy(t));
        }
        Ok(())
    }

    #[test]
    fn real_bodies_are_scanned_fast_and_read_as_serde_reads_them() {
        for body in real_bodies() {
            assert!(scan(&body).is_some(), "{}", String::from_utf8_lossy(&body));
            check(&body).unwrap();
        }
    }

    #[test]
    fn the_scan_leaves_doubtful_bodies_to_serde() {
        for body in [
            &br#"{"model":"a","model":"b"}"#[..],
            br#"{"mod\u0065l":"gpt-4o"}"#,
            br#"{"model":"gpt\u002d4o"}"#,
            br#"{"model":"gpt-4o","max_tokens":1.0}"#,
            br#"{"model":"gpt-4o","max_tokens":18446744073709551615}"#,
            br#"{"model":"gpt-4o","tools":[["web_search",3]]}"#,
            br#"["gpt-4o",10]"#,
            br#"{"model":"gpt-4o"} x"#,
        ] {
            assert!(scan(body).is_none(), "{}", String::from_utf8_lossy(body));
            check(body).unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// The estimate with its fast scan answers exactly as the serde path alone, on
        /// damaged real bodies and on arbitrary ones.
        #[test]
        fn the_fast_scan_agrees_with_serde(
            t in prop_oneof![
                3 => prop::sample::select(real_bodies()).prop_flat_map(mutated),
                2 => members(),
                1 => json_ish(),
            ]
        ) {
            check(&t)?;
        }
    }
}
