//! What a request may cost at most, before it is sent.

use std::borrow::Cow;

use serde::Deserialize;

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
        .filter(|t| {
            t.kind
                .as_deref()
                .is_some_and(|k| k.starts_with("web_search"))
        })
        .filter_map(|t| t.max_uses)
        .fold(0, u64::saturating_add)
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
    .unwrap_or(default_max_tokens)
    .saturating_mul(head.n.unwrap_or(1).max(1));
    let input = (body.len() as u64).div_ceil(bytes_per_token.max(1));
    let web_search_requests = searches(head.tools.as_deref());
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
                estimate(&marked, &table, 3, 4096),
                estimate(body, &table, 3, 4096),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
