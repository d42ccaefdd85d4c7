//! Fuzzes reading usage from a whole JSON answer (`UsageExtractor::feed_json`) against
//! serde_json's own verdict on the same bytes.
//!
//! Properties:
//! - bytes serde_json rejects are a parse failure: no usage, no model, not finished;
//! - bytes serde_json accepts read exactly as serde_json's own rendering of the same
//!   document does (escapes decoded, numbers and member order normalised): same usage,
//!   model, format, end and error. The reader's fast path (a checking skipper) and its serde
//!   path must therefore agree on every answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::cost::usage::UsageExtractor;

fn read(bytes: &[u8]) -> UsageExtractor {
    let mut x = UsageExtractor::new();
    x.feed_json(bytes);
    x
}

fuzz_target!(|bytes: &[u8]| {
    let x = read(bytes);
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Err(_) => {
            assert_eq!(x.parse_failures(), 1);
            assert!(!x.saw_usage() && !x.finished());
            assert_eq!(x.model(), None);
            assert_eq!(*x.usage(), Default::default());
        }
        Ok(doc) => {
            let y = read(&serde_json::to_vec(&doc).unwrap());
            assert_eq!(x.parse_failures(), 0);
            assert_eq!(x.usage(), y.usage());
            assert_eq!(x.model(), y.model());
            assert_eq!(x.format(), y.format());
            assert_eq!(x.finished(), y.finished());
            assert_eq!(x.saw_usage(), y.saw_usage());
            assert_eq!(x.upstream_error(), y.upstream_error());
        }
    }
});
