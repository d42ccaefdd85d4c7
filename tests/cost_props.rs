//! Properties of the SSE parser and usage extraction (proptest).

use palisade::cost::Money;
use palisade::cost::sse::SseParser;
use palisade::cost::usage::{Usage, UsageExtractor};
use proptest::prelude::*;

const STREAMS: [&str; 5] = [
    include_str!("cost_data/anthropic_sonnet37.sse"),
    include_str!("cost_data/anthropic_opus47.sse"),
    include_str!("cost_data/openai_gpt4o.sse"),
    include_str!("cost_data/anthropic_opus47_1h.sse"),
    include_str!("cost_data/openai_responses.sse"),
];

fn extract(chunks: &[&[u8]]) -> (Usage, Option<String>) {
    let mut parser = SseParser::new();
    let mut x = UsageExtractor::new();
    for c in chunks {
        parser.feed_filtered(c, UsageExtractor::wants_data, |ev| {
            x.on_event(ev.event, ev.data)
        });
    }
    (*x.usage(), x.model().map(str::to_owned))
}

fn cut(text: &[u8], mut points: Vec<usize>) -> Vec<&[u8]> {
    points.iter_mut().for_each(|p| *p %= text.len() + 1);
    points.sort_unstable();
    let mut out = Vec::new();
    let mut last = 0;
    for p in points {
        out.push(&text[last..p]);
        last = p;
    }
    out.push(&text[last..]);
    out
}

proptest! {
    #[test]
    fn any_chunking_gives_the_same_usage(which in 0usize..STREAMS.len(), points in proptest::collection::vec(any::<usize>(), 0..40)) {
        let text = STREAMS[which].as_bytes();
        let whole = extract(&[text]);
        prop_assert!(!whole.0.is_empty());
        prop_assert_eq!(extract(&cut(text, points)), whole);
    }

    #[test]
    fn line_endings_do_not_matter(which in 0usize..STREAMS.len(), ending in 0usize..3) {
        let normal = STREAMS[which].replace("\r\n", "\n").replace('\r', "\n");
        let eol = ["\n", "\r\n", "\r"][ending];
        let text = normal.replace('\n', eol);
        prop_assert_eq!(extract(&[text.as_bytes()]), extract(&[normal.as_bytes()]));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
        max_line in 1usize..200,
    ) {
        let mut parser = SseParser::with_max_line(max_line);
        let mut x = UsageExtractor::new();
        for c in &chunks {
            parser.feed_filtered(c, UsageExtractor::wants_data, |ev| {
                assert!(ev.data.len() <= max_line);
                x.on_event(ev.event, ev.data);
            });
            // unfinished line + event data + event name, each bounded by the limit
            prop_assert!(parser.buffered() <= 3 * max_line);
        }
    }

    #[test]
    fn running_totals_replace(totals in proptest::collection::vec(0u64..1_000_000, 1..20)) {
        let mut x = UsageExtractor::new();
        x.on_event(b"message_start", br#"{"type":"message_start","message":{"model":"claude-haiku-4-5","usage":{"input_tokens":7,"output_tokens":1}}}"#);
        for t in &totals {
            let data = format!(r#"{{"type":"message_delta","usage":{{"output_tokens":{t}}}}}"#);
            x.on_event(b"message_delta", data.as_bytes());
        }
        prop_assert_eq!(x.usage().output_tokens, *totals.last().unwrap());
        prop_assert_eq!(x.usage().input_tokens, 7);
    }

    /// Money leaves the crate as an exact decimal string of dollars and comes back as the
    /// same pico-dollars, up to the largest amount; never more than 12 decimals.
    #[test]
    fn money_round_trips_through_its_decimal_string(picos in prop_oneof![any::<u128>(), 0u128..10_000_000_000_000, Just(u128::MAX)]) {
        let m = Money::from_picos(picos);
        let json = serde_json::to_string(&m).unwrap();
        prop_assert!(json.starts_with('"') && json.ends_with('"'));
        let decimals = json.trim_matches('"').split_once('.').map_or(0, |(_, f)| f.len());
        prop_assert!(decimals <= 12 && !json.trim_matches('"').ends_with('.'));
        prop_assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), m);
        prop_assert_eq!(m.to_string().parse::<Money>().unwrap(), m);
    }
}
