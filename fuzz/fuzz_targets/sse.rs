//! Fuzzes the SSE parser and usage extraction: arbitrary bytes, split at arbitrary points,
//! must never panic, must keep memory bounded, and must give the same usage however the
//! bytes are split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::cost::sse::SseParser;
use palisade::cost::usage::UsageExtractor;

const MAX_LINE: usize = 256;

fn run(chunks: &[&[u8]]) -> (palisade::cost::Usage, Option<String>, bool) {
    let mut parser = SseParser::with_max_line(MAX_LINE);
    let mut x = UsageExtractor::new();
    for c in chunks {
        parser.feed_filtered(c, UsageExtractor::wants_data, |ev| {
            assert!(ev.data.len() <= MAX_LINE);
            x.on_event(ev.event, ev.data);
        });
        assert!(parser.buffered() <= 3 * MAX_LINE);
    }
    (*x.usage(), x.model().map(str::to_owned), x.finished())
}

fuzz_target!(|input: &[u8]| {
    // The first byte picks the split points; the rest is the stream.
    let Some((&seed, text)) = input.split_first() else {
        return;
    };
    let whole = run(&[text]);
    let mut chunks = Vec::new();
    let mut rest = text;
    let step = usize::from(seed % 17) + 1;
    while !rest.is_empty() {
        let n = step.min(rest.len());
        chunks.push(&rest[..n]);
        rest = &rest[n..];
    }
    assert_eq!(run(&chunks), whole);
    // And the JSON path must not panic on the same bytes.
    let mut x = UsageExtractor::new();
    x.feed_json(text);
});
