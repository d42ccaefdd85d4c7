//! One rule's check items and settlements, for the store tests that drive `MemoryStore` and
//! `RedisStore` directly: rule 0, named `r`.
#![allow(dead_code)]

use palisade::rate_limit::RateKey;
use palisade::rate_limit::algorithm::Params;
use palisade::rate_limit::store::{CheckItem, RuleDecision, Settlement};

/// The name of the one rule.
pub const RULE: &str = "r";

/// Asks for `cost` units of rule `r` for `key`.
pub fn item(key: &RateKey, params: Params, cost: u64) -> CheckItem<'_> {
    CheckItem {
        rule_index: 0,
        rule: RULE,
        key,
        params,
        cost,
        shadow: false,
    }
}

/// Settles the reservation `d` of rule `r` for `key` by `delta` units (more used: above 0).
pub fn settlement<'a>(
    key: &'a RateKey,
    params: Params,
    d: &RuleDecision,
    delta: i64,
) -> Settlement<'a> {
    Settlement {
        rule_index: 0,
        rule: RULE,
        key,
        params,
        window_start: d.window_start,
        generation: d.generation,
        reservation_end: d.reservation_end,
        delta,
    }
}
