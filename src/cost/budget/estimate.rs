//! What a request may cost at most, before it is sent.

use std::borrow::Cow;

use serde::Deserialize;

use super::shape::{FIELDS, Shape};
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
    /// The tools, for the server-side web searches (billed per search, their results as
    /// input) and web fetches (their pages billed as input) they allow.
    #[serde(default)]
    tools: Option<ToolSums>,
}

/// A tool of the request, as far as its price goes: an object (a list, which serde
/// would read by position, is no tool).
struct Tool<'a>(ToolFields<'a>);

#[derive(Deserialize)]
struct ToolFields<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    /// The most searches or fetches a web search or web fetch tool may run (Anthropic's
    /// `max_uses`).
    #[serde(default)]
    max_uses: Option<u64>,
    /// The most tokens of a page a web fetch tool adds to the context.
    #[serde(default)]
    max_content_tokens: Option<u64>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Tool<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Object<'a> {
            type Value = Tool<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a tool object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Tool<'a>, A::Error> {
                ToolFields::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Tool)
            }
        }
        d.deserialize_map(Object(std::marker::PhantomData))
    }
}

/// What the estimate assumes where a request does not say: the layer's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Assumptions {
    /// Bytes of body counted as one input token.
    pub(crate) bytes_per_token: u64,
    /// Output tokens reserved when the request sets no output limit.
    pub(crate) default_max_tokens: u64,
    /// Uses reserved for a web search or web fetch tool without `max_uses`.
    pub(crate) default_max_uses: u64,
    /// Input tokens reserved for each search allowed (the results added to the context).
    pub(crate) tokens_per_web_search: u64,
    /// Input tokens reserved for each fetch allowed without `max_content_tokens`.
    pub(crate) tokens_per_web_fetch: u64,
}

impl Assumptions {
    /// The defaults of [`BudgetLayer::builder`](super::BudgetLayer::builder).
    pub(crate) const DEFAULT: Assumptions = Assumptions {
        bytes_per_token: 3,
        default_max_tokens: 4096,
        default_max_uses: 10,
        tokens_per_web_search: 10_000,
        tokens_per_web_fetch: 25_000,
    };
}

/// The sums over a request's tools that its worst cost needs, added up as the list is
/// read: a list of a million tools takes no more memory than one.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ToolSums {
    /// The `max_uses` of the web search tools that give one.
    searches: u64,
    /// Web search tools without `max_uses`.
    open_searches: u64,
    /// `max_uses × max_content_tokens` of the web fetch tools that give both.
    pages: u64,
    /// The `max_uses` of the web fetch tools without `max_content_tokens`.
    fetches_of_open_pages: u64,
    /// The `max_content_tokens` of the web fetch tools without `max_uses`.
    pages_of_open_fetches: u64,
    /// Web fetch tools with neither.
    open_fetches: u64,
}

impl ToolSums {
    fn add(&mut self, tool: &ToolFields<'_>) {
        let Some(kind) = tool.kind.as_deref() else {
            return;
        };
        let add = |sum: &mut u64, n: u64| *sum = sum.saturating_add(n);
        if kind.starts_with("web_search") {
            match tool.max_uses {
                Some(uses) => add(&mut self.searches, uses),
                None => add(&mut self.open_searches, 1),
            }
        } else if kind.starts_with("web_fetch") {
            match (tool.max_uses, tool.max_content_tokens) {
                (Some(uses), Some(tokens)) => add(&mut self.pages, uses.saturating_mul(tokens)),
                (Some(uses), None) => add(&mut self.fetches_of_open_pages, uses),
                (None, Some(tokens)) => add(&mut self.pages_of_open_fetches, tokens),
                (None, None) => add(&mut self.open_fetches, 1),
            }
        }
    }
}

impl<'de> Deserialize<'de> for ToolSums {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct List;
        impl<'de> serde::de::Visitor<'de> for List {
            type Value = ToolSums;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of tools")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ToolSums, A::Error> {
                let mut sums = ToolSums::default();
                while let Some(Tool(tool)) = seq.next_element::<Tool<'de>>()? {
                    sums.add(&tool);
                }
                Ok(sums)
            }
        }
        d.deserialize_seq(List)
    }
}

/// What the server tools of a request may add: web searches (each billed) and the input
/// tokens of their results and of the pages fetched.
#[derive(Debug, Default, PartialEq, Eq)]
struct ServerTools {
    searches: u64,
    input_tokens: u64,
}

/// The most the tools allow: for each web search tool, its `max_uses` searches
/// (`default_max_uses` without it) with `tokens_per_web_search` tokens of results each;
/// for each web fetch tool, its `max_uses` fetches (the same default) of its
/// `max_content_tokens` (`tokens_per_web_fetch` without it) each. Every sum saturates.
fn server_tools(tools: Option<ToolSums>, assume: &Assumptions) -> ServerTools {
    let t = tools.unwrap_or_default();
    let (uses, fetch_tokens) = (assume.default_max_uses, assume.tokens_per_web_fetch);
    let searches = t
        .searches
        .saturating_add(t.open_searches.saturating_mul(uses));
    let input_tokens = searches
        .saturating_mul(assume.tokens_per_web_search)
        .saturating_add(t.pages)
        .saturating_add(t.fetches_of_open_pages.saturating_mul(fetch_tokens))
        .saturating_add(t.pages_of_open_fetches.saturating_mul(uses))
        .saturating_add(
            t.open_fetches
                .saturating_mul(uses)
                .saturating_mul(fetch_tokens),
        );
    ServerTools {
        searches,
        input_tokens,
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

/// Estimates from a JSON body: input tokens as `ceil(len / bytes_per_token)`, plus
/// `tokens_per_web_search` for each web search allowed (its results join the context) and
/// the `max_content_tokens` (else `tokens_per_web_fetch`) of each web fetch allowed,
/// priced at the dearest input rate (plain or cache write, at the long-context tier when
/// they pass its threshold), plus the output limit (the largest one given) at the output
/// price for each of the `n` choices asked for, plus the web searches its tools allow at
/// the model's price per search. A web search or web fetch tool allows its `max_uses`, or
/// `default_max_uses` without it. Every sum saturates.
///
/// Not reserved: code execution, billed by container time, which the price table and the
/// usage record do not know.
///
/// A body opening with a UTF-8 byte-order mark is read as the JSON after it (as lenient
/// JSON readers do, so an upstream may well accept it): it is estimated as that JSON alone.
pub(crate) fn estimate(body: &[u8], prices: &PriceTable, assume: &Assumptions) -> Estimate {
    let body = body.strip_prefix(BOM).unwrap_or(body);
    let head = match serde_json::from_slice::<Head<'_>>(body) {
        Ok(head) => head,
        Err(e) => return unreadable(body, &e),
    };
    let Some(model) = head.model else {
        return Estimate::NotMetered;
    };
    let Some(price) = prices.get(&model) else {
        return Estimate::Unpriced(model.into_owned());
    };
    let output = [
        head.max_tokens,
        head.max_completion_tokens,
        head.max_output_tokens,
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(assume.default_max_tokens)
    .saturating_mul(head.n.unwrap_or(1).max(1));
    let tools = server_tools(head.tools, assume);
    let web_search_requests = tools.searches;
    // The results of every search and the pages of every fetch join the input tokens.
    let input = (body.len() as u64)
        .div_ceil(assume.bytes_per_token.max(1))
        .saturating_add(tools.input_tokens);
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

const LIMITS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// Why a `tools` field the estimate cannot read is refused.
const TOOLS_REASON: &str = "must be a list of tools, each an object with a string type and \
                            whole numbers for max_uses and max_content_tokens";

/// The fields of a tool the estimate reads.
const TOOL_FIELDS: [&str; 3] = ["type", "max_uses", "max_content_tokens"];

/// Why a body the estimate could not read is refused, or `NotMetered` when it is not a
/// JSON object naming a model at all. The fields are judged by their types alone, so a
/// body nested however deeply (where a map of values could not be read) is judged too.
fn unreadable(body: &[u8], e: &serde_json::Error) -> Estimate {
    // the top object, the tools list, each tool, each tool's fields
    let Some(Shape::Object(map)) = Shape::of(body, 3, &FIELDS) else {
        return unreadable_number(body);
    };
    let Some(model) = map.get("model") else {
        return Estimate::NotMetered;
    };
    if *model != Shape::Text {
        return Estimate::Invalid {
            field: "model",
            reason: "must be a string".to_owned(),
        };
    }
    if let Some(field) = LIMITS
        .into_iter()
        .find(|f| map.get(*f).is_some_and(|v| !v.is_whole_or_null()))
    {
        return Estimate::Invalid {
            field,
            reason: "must be a whole number of tokens, 0 or more".to_owned(),
        };
    }
    if map.get("n").is_some_and(|v| !v.is_whole_or_null()) {
        return Estimate::Invalid {
            field: "n",
            reason: "must be a whole number of choices".to_owned(),
        };
    }
    let tools_ok = |v: &Shape| matches!(v, Shape::Null | Shape::List { tools: true });
    if map.get("tools").is_some_and(|v| !tools_ok(v)) {
        return Estimate::Invalid {
            field: "tools",
            reason: TOOLS_REASON.to_owned(),
        };
    }
    // The types are right, so a field is given twice: at the top, or inside a tool.
    let msg = e.to_string();
    let named = |f: &str| msg.contains(&format!("`{f}`"));
    let field = std::iter::once("model")
        .chain(LIMITS)
        .chain(["n", "tools"])
        .find(|f| named(f))
        .or_else(|| TOOL_FIELDS.iter().any(|f| named(f)).then_some("tools"))
        .unwrap_or("model");
    Estimate::Invalid {
        field,
        reason: "is given more than once".to_owned(),
    }
}

/// Why a body whose fields could not be read even for their types is refused: a field
/// the estimate reads holds a number serde_json reads as no type (`1e400`). `NotMetered`
/// when the body is not JSON, or not an object naming a model.
fn unreadable_number(body: &[u8]) -> Estimate {
    // skipping a value reads its text alone, whatever number it holds
    if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
        return Estimate::NotMetered;
    }
    // the fields at the top of a body: all but a tool's own
    for field in &FIELDS[..6] {
        match Shape::of(body, 3, std::slice::from_ref(field)) {
            Some(Shape::Object(map)) if *field == "model" && !map.contains_key("model") => {
                return Estimate::NotMetered;
            }
            Some(_) => {}
            None => {
                let reason = match *field {
                    "model" => "must be a string",
                    "n" => "must be a whole number of choices",
                    "tools" => TOOLS_REASON,
                    _ => "must be a whole number of tokens, 0 or more",
                };
                return Estimate::Invalid {
                    field,
                    reason: reason.to_owned(),
                };
            }
        }
    }
    Estimate::NotMetered
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default assumptions with `bytes_per_token` and `default_max_tokens` given.
    fn at(bytes_per_token: u64, default_max_tokens: u64) -> Assumptions {
        Assumptions {
            bytes_per_token,
            default_max_tokens,
            ..Assumptions::DEFAULT
        }
    }

    #[test]
    fn reserves_the_output_limit_and_the_dearest_input_rate() {
        let table = PriceTable::builtin();
        let body = br#"{"model":"claude-3-7-sonnet-20250219","max_tokens":1000}"#;
        let Estimate::Cost { model, max } = estimate(body, &table, &at(4, 4096)) else {
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
            &at(1_000_000, 7),
        ) else {
            panic!()
        };
        let Estimate::Cost { max: dflt, .. } =
            estimate(br#"{"model":"gpt-4o"}"#, &table, &at(1_000_000, 10))
        else {
            panic!()
        };
        assert_eq!(max, dflt);
    }

    #[test]
    fn bodies_without_a_model_are_not_metered_and_unknown_models_are_named() {
        let table = PriceTable::builtin();
        assert_eq!(
            estimate(b"not json", &table, &at(4, 1)),
            Estimate::NotMetered
        );
        assert_eq!(
            estimate(br#"{"name":"bot"}"#, &table, &at(4, 1)),
            Estimate::NotMetered
        );
        assert_eq!(
            estimate(br#"{"model":"my-model"}"#, &table, &at(4, 1)),
            Estimate::Unpriced("my-model".into())
        );
    }

    #[test]
    fn a_body_after_a_byte_order_mark_is_estimated_as_that_body_alone() {
        let table = PriceTable::builtin();
        for body in [
            &br#"{"model":"gpt-4o","max_tokens":10,"messages":[]}"#[..],
            br#"{"model":"gpt-4o","max_tokens":-1}"#,
            br#"{"model":"my-model"}"#,
            b"not json",
            b"\xEF\xBB\xBF{}",
        ] {
            let marked = [BOM, body].concat();
            assert_eq!(
                estimate(&marked, &table, &at(3, 4096)),
                estimate(body, &table, &at(3, 4096)),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn only_one_leading_utf8_byte_order_mark_is_skipped() {
        let table = PriceTable::builtin();
        let json = r#"{"model":"gpt-4o","max_tokens":10}"#;
        let utf16: Vec<u8> = [0xFF, 0xFE]
            .into_iter()
            .chain(json.encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        for body in [
            BOM,
            &utf16,
            "{\"model\":\"gpt-4o\",\u{feff}\"max_tokens\":10}".as_bytes(),
            format!(" \u{feff}{json}").as_bytes(),
        ] {
            assert_eq!(estimate(body, &table, &at(3, 4096)), Estimate::NotMetered);
        }
    }

    fn cost(body: &str, assume: &Assumptions) -> Money {
        match estimate(body.as_bytes(), &PriceTable::builtin(), assume) {
            Estimate::Cost { max, .. } => max,
            other => panic!("{body}: expected a cost, got {other:?}"),
        }
    }

    /// One input token for any body here: the search reserves stand out alone.
    fn searching(default_max_uses: u64, tokens_per_web_search: u64) -> Assumptions {
        Assumptions {
            bytes_per_token: 1_000_000,
            default_max_uses,
            tokens_per_web_search,
            ..Assumptions::DEFAULT
        }
    }

    /// A web search tool without `max_uses` may run as many searches as the model likes,
    /// each billed: it reserved none, so requests in flight could overrun a budget.
    #[test]
    fn a_web_search_tool_without_max_uses_reserves_the_default_searches() {
        let assume = searching(7, 0);
        let unbounded = r#"{"model":"claude-3-7-sonnet","max_tokens":100,"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#;
        let seven = r#"{"model":"claude-3-7-sonnet","max_tokens":100,"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":7}]}"#;
        let none = r#"{"model":"claude-3-7-sonnet","max_tokens":100}"#;
        assert_eq!(cost(unbounded, &assume), cost(seven, &assume));
        // seven searches at $10 per thousand
        assert_eq!(
            cost(unbounded, &assume).picos(),
            cost(none, &assume).picos() + 7 * 10_000_000_000
        );
        // `null` is no limit either; a later tool version counts the same
        let null = r#"{"model":"claude-3-7-sonnet","max_tokens":100,"tools":[{"type":"web_search_20260209","name":"web_search","max_uses":null}]}"#;
        assert_eq!(cost(null, &assume), cost(seven, &assume));
        // 0 reserves none for such a tool (the earlier behaviour, chosen knowingly)
        assert_eq!(cost(unbounded, &searching(0, 0)), cost(none, &assume));
    }

    #[test]
    fn every_web_search_tool_counts_and_other_tools_do_not() {
        let assume = searching(4, 0);
        let body = r#"{"model":"claude-3-7-sonnet","max_tokens":100,"tools":[
            {"type":"web_search_20250305","name":"a","max_uses":2},
            {"type":"web_search_20260209","name":"b"},
            {"name":"get_weather","input_schema":{"type":"object"}},
            {"type":"custom","name":"c","max_uses":50}]}"#;
        let none = r#"{"model":"claude-3-7-sonnet","max_tokens":100}"#;
        assert_eq!(
            cost(body, &assume).picos(),
            cost(none, &assume).picos() + (2 + 4) * 10_000_000_000
        );
    }

    /// Search results are billed as input tokens of the request: each search allowed
    /// reserves `tokens_per_web_search` of them, at the dearest input rate.
    #[test]
    fn each_search_allowed_reserves_its_results_as_input_at_the_dearest_rate() {
        let body = r#"{"model":"claude-3-7-sonnet","max_tokens":1000,"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":3}]}"#;
        // 1000 × $15/Mtok output; 1 + 3 × 2000 input tokens × $6/Mtok (1-hour cache
        // write); three searches at one cent
        assert_eq!(
            cost(body, &searching(10, 2000)).picos(),
            1000 * 15_000_000 + (1 + 3 * 2000) * 6_000_000 + 3 * 10_000_000_000
        );
        let unbounded = r#"{"model":"claude-3-7-sonnet","max_tokens":1000,"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#;
        assert_eq!(
            cost(unbounded, &searching(3, 2000)),
            cost(body, &searching(10, 2000))
        );
        // no search allowed, no search tokens
        let none = r#"{"model":"claude-3-7-sonnet","max_tokens":1000}"#;
        assert_eq!(
            cost(none, &searching(3, 2000)).picos(),
            1000 * 15_000_000 + 6_000_000
        );
    }

    /// The search results count toward the long-context threshold, as the request's
    /// input tokens do when it is billed.
    #[test]
    fn search_results_can_carry_a_request_into_the_long_context_tier() {
        let table = PriceTable::builtin();
        let price = table.get("claude-sonnet-4-5").unwrap();
        let (threshold, _) = price.long_context.unwrap();
        let body = r#"{"model":"claude-sonnet-4-5","max_tokens":10,"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":1}]}"#;
        let want = price.cost(&Usage {
            cache_write_1h_tokens: 1 + threshold,
            output_tokens: 10,
            web_search_requests: 1,
            ..Usage::default()
        });
        assert_eq!(cost(body, &searching(10, threshold)), want);
        let base = crate::cost::pricing::ModelPrice::new(price.base, "base only")
            .with_web_search(price.web_search);
        let at_base = base.cost(&Usage {
            cache_write_1h_tokens: 1 + threshold,
            output_tokens: 10,
            web_search_requests: 1,
            ..Usage::default()
        });
        assert!(
            want > at_base,
            "{want} at the long-context tier, {at_base} below it"
        );
    }

    #[test]
    fn huge_search_counts_and_settings_saturate() {
        let max = u64::MAX;
        let searches = u128::from(max) * 10_000_000_000;
        for (body, assume) in [
            (
                format!(r#"{{"model":"claude-sonnet-4-5","tools":[{{"type":"web_search_20250305","max_uses":{max}}},{{"type":"web_search_20250305","max_uses":{max}}}]}}"#),
                searching(0, max),
            ),
            (
                r#"{"model":"claude-sonnet-4-5","tools":[{"type":"web_search_20250305"},{"type":"web_search_20250305"}]}"#.to_owned(),
                searching(max, max),
            ),
            (
                r#"{"model":"claude-sonnet-4-5","tools":[{"type":"web_search_20250305"}]}"#.to_owned(),
                searching(max, 1),
            ),
        ] {
            let max_cost = cost(&body, &assume);
            assert!(max_cost.picos() > searches, "{body}: {max_cost}");
        }
    }

    /// A web fetch has no fee, but the page it fetches joins the input: each fetch allowed
    /// reserves its `max_content_tokens`, or `tokens_per_web_fetch` without it.
    #[test]
    fn each_fetch_allowed_reserves_its_page_as_input_at_the_dearest_rate() {
        let assume = Assumptions {
            tokens_per_web_fetch: 3000,
            ..searching(4, 2000)
        };
        let none = r#"{"model":"claude-3-7-sonnet","max_tokens":1000}"#;
        let bounded = r#"{"model":"claude-3-7-sonnet","max_tokens":1000,"tools":[{"type":"web_fetch_20250910","name":"web_fetch","max_uses":2,"max_content_tokens":5000}]}"#;
        // two pages of 5,000 tokens at $6/Mtok (1-hour cache write), no fee
        assert_eq!(
            cost(bounded, &assume).picos(),
            cost(none, &assume).picos() + 2 * 5000 * 6_000_000
        );
        // without either bound: 4 fetches of 3,000 tokens
        let open = r#"{"model":"claude-3-7-sonnet","max_tokens":1000,"tools":[{"type":"web_fetch_20250910","name":"web_fetch"}]}"#;
        assert_eq!(
            cost(open, &assume).picos(),
            cost(none, &assume).picos() + 4 * 3000 * 6_000_000
        );
        // a search and a fetch together: one search (fee and results), one page
        let both = r#"{"model":"claude-3-7-sonnet","max_tokens":1000,"tools":[
            {"type":"web_search_20250305","name":"web_search","max_uses":1},
            {"type":"web_fetch_20250910","name":"web_fetch","max_uses":1}]}"#;
        assert_eq!(
            cost(both, &assume).picos(),
            cost(none, &assume).picos() + 10_000_000_000 + (2000 + 3000) * 6_000_000
        );
        let huge = format!(
            r#"{{"model":"claude-3-7-sonnet","tools":[{{"type":"web_fetch_20250910","max_uses":{m},"max_content_tokens":{m}}}]}}"#,
            m = u64::MAX
        );
        assert!(cost(&huge, &assume).picos() >= u128::from(u64::MAX) * 6_000_000);
    }

    #[test]
    fn a_max_uses_that_is_not_a_whole_number_is_invalid() {
        let table = PriceTable::builtin();
        for bad in ["-1", "1.5", "\"3\"", "true", "18446744073709551616"] {
            for body in [
                format!(
                    r#"{{"model":"claude-sonnet-4-5","tools":[{{"type":"web_search_20250305","max_uses":{bad}}}]}}"#
                ),
                format!(
                    r#"{{"model":"claude-sonnet-4-5","tools":[{{"type":"web_fetch_20250910","max_content_tokens":{bad}}}]}}"#
                ),
            ] {
                assert!(
                    matches!(
                        estimate(body.as_bytes(), &table, &Assumptions::DEFAULT),
                        Estimate::Invalid { field: "tools", .. }
                    ),
                    "{body}"
                );
            }
        }
    }

    /// The sums folded as the list is read give what adding up each tool's own reserve
    /// gives (saturating at the same place), for any tools and any settings.
    mod folded {
        use super::*;
        use proptest::prelude::*;

        fn one_by_one(tools: &[ToolFields<'_>], assume: &Assumptions) -> ServerTools {
            let mut sum = ServerTools::default();
            for tool in tools {
                let Some(kind) = tool.kind.as_deref() else {
                    continue;
                };
                let uses = tool.max_uses.unwrap_or(assume.default_max_uses);
                let each = if kind.starts_with("web_search") {
                    sum.searches = sum.searches.saturating_add(uses);
                    assume.tokens_per_web_search
                } else if kind.starts_with("web_fetch") {
                    tool.max_content_tokens
                        .unwrap_or(assume.tokens_per_web_fetch)
                } else {
                    continue;
                };
                sum.input_tokens = sum.input_tokens.saturating_add(uses.saturating_mul(each));
            }
            sum
        }

        fn number() -> impl Strategy<Value = u64> {
            prop_oneof![
                0..20u64,
                Just(u64::MAX),
                any::<u64>(),
                (1u64 << 32)..(1u64 << 33)
            ]
        }

        fn tool() -> impl Strategy<Value = (Option<&'static str>, Option<u64>, Option<u64>)> {
            (
                proptest::option::of(prop_oneof![
                    Just("web_search_20250305"),
                    Just("web_fetch_20250910"),
                    Just("custom"),
                ]),
                proptest::option::of(number()),
                proptest::option::of(number()),
            )
        }

        proptest! {
            #[test]
            fn fold_equals_one_by_one(
                tools in proptest::collection::vec(tool(), 0..8),
                uses in number(),
                search in number(),
                fetch in number(),
            ) {
                let assume = Assumptions {
                    default_max_uses: uses,
                    tokens_per_web_search: search,
                    tokens_per_web_fetch: fetch,
                    ..Assumptions::DEFAULT
                };
                let tools: Vec<ToolFields<'_>> = tools
                    .into_iter()
                    .map(|(kind, max_uses, max_content_tokens)| ToolFields {
                        kind: kind.map(Cow::Borrowed),
                        max_uses,
                        max_content_tokens,
                    })
                    .collect();
                let mut sums = ToolSums::default();
                for tool in &tools {
                    sums.add(tool);
                }
                prop_assert_eq!(server_tools(Some(sums), &assume), one_by_one(&tools, &assume));
            }
        }
    }
}
