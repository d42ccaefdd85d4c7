//! A sink that writes each record as a structured `tracing` event.

use super::{SinkError, UsageSink};
use crate::cost::record::UsageRecord;

/// Logs every record at `INFO` under the target `palisade::cost::usage`, with the ids,
/// token counts and cost as fields (API keys appear only as their hash).
///
/// ```
/// use palisade::cost::{TracingSink, UsageSink, UsageRecord, Usage};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let r = UsageRecord::new(std::time::SystemTime::now(), Some("gpt-4o".into()), Usage::default(), None);
/// TracingSink::new().record_batch(&[r]).await.unwrap();
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingSink {
    _priv: (),
}

impl TracingSink {
    /// A tracing sink.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl UsageSink for TracingSink {
    async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
        for r in batch {
            let a = &r.attribution;
            let key = a.api_key.map(|k| k.to_string());
            let cost = r.cost.map(|c| c.dollars_string());
            tracing::info!(
                target: "palisade::cost::usage",
                time_ms = r.unix_millis(),
                request_id = r.request_id.as_deref(),
                user = a.user.as_deref(),
                api_key = key.as_deref(),
                bot = a.bot.as_deref(),
                conversation = a.conversation.as_deref(),
                route = %r.route,
                model = r.model.as_deref(),
                input_tokens = r.usage.input_tokens,
                output_tokens = r.usage.output_tokens,
                cache_write_5m_tokens = r.usage.cache_write_5m_tokens,
                cache_write_1h_tokens = r.usage.cache_write_1h_tokens,
                cache_read_tokens = r.usage.cache_read_tokens,
                web_search_requests = r.usage.web_search_requests,
                cost_usd = cost.as_deref(),
                duration_ms = u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX),
                status = r.status,
                stream = r.stream,
                completion = ?r.completion,
                upstream_error = r.upstream_error.as_deref(),
                "usage"
            );
        }
        Ok(())
    }
}
