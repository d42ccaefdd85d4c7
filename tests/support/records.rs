//! A spread of usage records the ledger tests write and compare: users, keys, models, days,
//! token classes and outcomes.
#![allow(dead_code)]

use std::time::{Duration, UNIX_EPOCH};

use palisade::cost::{Attribution, Completion, Money, Usage, UsageRecord};
use palisade::key::ApiKeyId;

/// The users records are spread over.
pub const USERS: [&str; 7] = ["ann", "bob", "cy", "dee", "Eve", "éclair", "zed"];

/// Record `i`: a spread of users, keys, models, days, token classes and outcomes.
pub fn record(i: u64) -> UsageRecord {
    let base = UNIX_EPOCH + Duration::from_secs(1_767_225_600); // 2026-01-01
    let time = base + Duration::from_millis(i * 25_913); // about three days for 10 000
    let usage = Usage {
        input_tokens: i % 997,
        output_tokens: (i * 7) % 4001,
        cache_write_5m_tokens: i % 5,
        cache_write_1h_tokens: i % 3,
        cache_read_tokens: (i * 13) % 1000,
        web_search_requests: i % 2,
    };
    let cost = (i % 11 != 0).then(|| Money::from_picos(u128::from(i) * 1_234_567_891));
    let model = match i % 4 {
        0 => None,
        1 => Some("claude-sonnet-4-5".to_owned()),
        2 => Some("gpt-4o".to_owned()),
        _ => Some("mystery".to_owned()),
    };
    let mut attribution = Attribution::default();
    if i % 9 != 0 {
        attribution.user = Some(USERS[(i % 7) as usize].to_owned());
    }
    if i % 3 == 0 {
        attribution.api_key = Some(ApiKeyId::from_key(&format!("sk-{}", i % 5)));
    }
    attribution.bot = (i % 2 == 0).then(|| "helper".to_owned());
    let mut r = UsageRecord::new(time, model, usage, cost).with_attribution(attribution);
    r.request_id = (i % 13 != 0).then(|| format!("req_{i}"));
    r.route = "/v1/messages".into();
    r.stream = i % 2 == 1;
    r.completion = if i % 17 == 0 {
        Completion::Partial
    } else {
        Completion::Complete
    };
    r.duration = Duration::from_millis(i % 3000);
    r
}

/// Checks one dead letter as a sink stored it: it names `record` by id, holds the whole
/// record as JSON, and its error text contains `reason`.
pub fn assert_dead_letter(record: &UsageRecord, id: &str, json: &str, error: &str, reason: &str) {
    assert_eq!(id, record.id.to_string());
    let dead: UsageRecord = serde_json::from_str(json).unwrap();
    assert_eq!(&dead, record);
    assert!(error.contains(reason), "{error}");
}
