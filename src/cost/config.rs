//! [`CostConfig`]: the layer's settings from files or `PALISADE_COST_*` variables.

use std::path::PathBuf;
use std::sync::Arc;

use http::HeaderName;
use serde::{Deserialize, Serialize};

use super::layer::CostMeterLayer;
use super::pricing::{PriceError, PriceTable};
use super::sink::{RecorderConfig, RecorderShutdown, UsageRecorder, UsageSink};
use crate::config::{Env, ProblemKind, env_var};

/// The prefix of the cost meter's environment variables.
pub(crate) const ENV_PREFIX: &str = "PALISADE_COST";

/// Settings of [`CostMeterLayer`].
///
/// ```
/// use palisade::config::Env;
/// use palisade::cost::{CostConfig, MemorySink};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let mut env = Env::from_pairs([("PALISADE_COST_SSE_COMMENT", "true"), ("PALISADE_COST_BOT_HEADER", "none")]);
/// let cfg = CostConfig::from_env(&mut env);
/// env.finish().unwrap();
/// assert!(cfg.sse_comment);
/// assert_eq!(cfg.bot_header, None);
/// let (layer, shutdown) = cfg.spawn(MemorySink::new()).unwrap();
/// # drop(layer);
/// shutdown.shutdown().await;
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct CostConfig {
    /// Header naming the user (default `None`: not read). Client-supplied: set it only
    /// behind a trusted proxy that sets it; a [`Principal`](super::Principal) extension
    /// comes first.
    pub user_header: Option<String>,
    /// Header naming the bot.
    pub bot_header: Option<String>,
    /// Header naming the conversation.
    pub conversation_header: Option<String>,
    /// Header with the request id.
    pub request_id_header: Option<String>,
    /// Record the hashed API key from `x-api-key` / `authorization`.
    pub hash_api_key: bool,
    /// Take the user from the request body's `metadata.user_id` (with
    /// [`BodyUserIdLayer`](super::BodyUserIdLayer)).
    pub user_from_body: bool,
    /// Add cost headers (`x-palisade-cost-usd` and token counts) to small non-streamed
    /// JSON responses that reported usage.
    #[serde(alias = "cost_headers")]
    pub headers: bool,
    /// The largest `content-length` read whole for cost headers.
    #[serde(alias = "cost_headers_max_body")]
    pub headers_max_body: u64,
    /// Append a `: palisade-cost …` comment at the end of event streams.
    #[serde(alias = "sse_cost_comment")]
    pub sse_comment: bool,
    /// The largest JSON body scanned for usage.
    pub max_json_body: usize,
    /// The longest SSE line kept.
    pub max_sse_line: usize,
    /// Start from the built-in price table.
    pub builtin_prices: bool,
    /// A LiteLLM-style JSON price map merged over the table.
    pub prices_file: Option<PathBuf>,
    /// The usage queue.
    pub queue: RecorderConfig,
}

impl Default for CostConfig {
    fn default() -> Self {
        Self {
            user_header: None,
            bot_header: Some("x-bot-id".to_owned()),
            conversation_header: Some("x-conversation-id".to_owned()),
            request_id_header: Some("x-request-id".to_owned()),
            hash_api_key: true,
            user_from_body: false,
            headers: false,
            headers_max_body: 256 * 1024,
            sse_comment: false,
            max_json_body: 1 << 20,
            max_sse_line: super::sse::DEFAULT_MAX_LINE,
            builtin_prices: true,
            prices_file: None,
            queue: RecorderConfig::default(),
        }
    }
}

/// A mistake in [`CostConfig`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CostConfigError {
    /// A header name that is not a valid HTTP header name.
    #[error("`{field}`: `{value}` is not a valid header name")]
    InvalidHeaderName {
        /// The field.
        field: &'static str,
        /// The value given.
        value: String,
    },
    /// A limit that must be positive is 0.
    #[error("`{0}` must be greater than 0")]
    Zero(&'static str),
    /// The price file could not be read.
    #[error("cannot read price file {path}: {source}")]
    PricesFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The price file is not a valid price map.
    #[error("invalid price map: {0}")]
    Prices(#[from] PriceError),
    /// [`CostMeterLayerBuilder::build`](super::CostMeterLayerBuilder::build) was called
    /// without a recorder.
    #[error("no usage recorder: call `.recorder(…)` (see `UsageRecorder::spawn`)")]
    MissingRecorder,
}

impl CostConfigError {
    /// The configuration field the mistake is in (its serde path, as
    /// [`env_var`] names it).
    pub fn field(&self) -> &'static str {
        match self {
            CostConfigError::InvalidHeaderName { field, .. } | CostConfigError::Zero(field) => {
                field
            }
            CostConfigError::PricesFile { .. } | CostConfigError::Prices(_) => "prices_file",
            CostConfigError::MissingRecorder => "recorder",
        }
    }
}

fn header(field: &'static str, v: &Option<String>) -> Result<Option<HeaderName>, CostConfigError> {
    v.as_deref()
        .map(|s| {
            HeaderName::try_from(s.trim()).map_err(|_| CostConfigError::InvalidHeaderName {
                field,
                value: s.to_owned(),
            })
        })
        .transpose()
}

fn header_env(env: &mut Env, name: &str, default: Option<String>) -> Option<String> {
    env.optional_with(name, default, "x-user-id (or `none`)", |s| {
        let s = s.trim();
        if s.eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        HeaderName::try_from(s)
            .map(|_| Some(s.to_ascii_lowercase()))
            .map_err(|_| "not a valid header name".to_owned())
    })
}

impl CostConfig {
    /// Reads the `PALISADE_COST_*` variables, recording every problem in `env`. Each
    /// variable is named after its field through [`env_var`]: `PALISADE_COST_USER_HEADER`,
    /// `_BOT_HEADER`, `_CONVERSATION_HEADER`, `_REQUEST_ID_HEADER` (a header name, or
    /// `none`), `_HASH_API_KEY`, `_USER_FROM_BODY`, `_HEADERS`, `_HEADERS_MAX_BODY`,
    /// `_SSE_COMMENT`, `_MAX_JSON_BODY`, `_MAX_SSE_LINE`, `_BUILTIN_PRICES`,
    /// `_PRICES_FILE`, `_QUEUE_CAPACITY`, `_QUEUE_MAX_BATCH`, `_QUEUE_RETRIES` and
    /// `_QUEUE_RETRY_BACKOFF` (`100ms`, `2s`).
    ///
    /// A variable set under its former name (`PALISADE_COST_COST_HEADERS`,
    /// `PALISADE_COST_BATCH_SIZE`, …) is reported as a problem naming the new one, so a
    /// setting is never silently ignored.
    pub fn from_env(env: &mut Env) -> Self {
        let d = Self::default();
        let var = |field: &str| env_var(ENV_PREFIX, field);
        for (old, field) in [
            ("PALISADE_COST_COST_HEADERS", "headers"),
            ("PALISADE_COST_COST_HEADERS_MAX_BODY", "headers_max_body"),
            ("PALISADE_COST_BATCH_SIZE", "queue.max_batch"),
            ("PALISADE_COST_SINK_RETRIES", "queue.retries"),
            ("PALISADE_COST_SINK_RETRY_BACKOFF", "queue.retry_backoff"),
        ] {
            if let Some(value) = env.raw(old).map(str::to_owned) {
                let new = var(field);
                env.problem(
                    old,
                    crate::config::ProblemKind::Invalid {
                        value,
                        reason: format!("renamed to {new}"),
                    },
                    &format!("unset, and set {new}"),
                );
            }
        }
        let positive = |s: &str| -> Result<usize, String> {
            match s.trim().parse::<usize>() {
                Ok(0) => Err("must be greater than 0".to_owned()),
                Ok(n) => Ok(n),
                Err(e) => Err(e.to_string()),
            }
        };
        let config = Self {
            user_header: header_env(env, &var("user_header"), d.user_header),
            bot_header: header_env(env, &var("bot_header"), d.bot_header),
            conversation_header: header_env(
                env,
                &var("conversation_header"),
                d.conversation_header,
            ),
            request_id_header: header_env(env, &var("request_id_header"), d.request_id_header),
            hash_api_key: env.optional(&var("hash_api_key"), d.hash_api_key, "true"),
            user_from_body: env.optional(&var("user_from_body"), d.user_from_body, "true"),
            headers: env.optional(&var("headers"), d.headers, "true"),
            headers_max_body: env.optional(&var("headers_max_body"), d.headers_max_body, "262144"),
            sse_comment: env.optional(&var("sse_comment"), d.sse_comment, "true"),
            max_json_body: env.optional_with(
                &var("max_json_body"),
                d.max_json_body,
                "1048576",
                positive,
            ),
            max_sse_line: env.optional_with(
                &var("max_sse_line"),
                d.max_sse_line,
                "1048576",
                positive,
            ),
            builtin_prices: env.optional(&var("builtin_prices"), d.builtin_prices, "true"),
            prices_file: env
                .raw(&var("prices_file"))
                .map(|p| PathBuf::from(p.trim())),
            queue: RecorderConfig {
                capacity: env.optional_with(
                    &var("queue.capacity"),
                    d.queue.capacity,
                    "10000",
                    positive,
                ),
                max_batch: env.optional_with(
                    &var("queue.max_batch"),
                    d.queue.max_batch,
                    "256",
                    positive,
                ),
                retries: env.optional(&var("queue.retries"), d.queue.retries, "3"),
                retry_backoff: env.duration(
                    &var("queue.retry_backoff"),
                    d.queue.retry_backoff,
                    "100ms",
                ),
            },
        };
        // Read and check the price file now, so a missing or malformed one is reported with
        // every other problem, under its own name (building from this config fails too).
        if let Some(path) = &config.prices_file {
            if let Err(e) = config.prices() {
                let reason = match e {
                    CostConfigError::PricesFile { source, .. } => {
                        format!("cannot read it: {source}")
                    }
                    other => other.to_string(),
                };
                env.problem(
                    &var("prices_file"),
                    ProblemKind::Invalid {
                        value: path.display().to_string(),
                        reason,
                    },
                    "/etc/palisade/prices.json",
                );
            }
        }
        config
    }

    /// The price table: the built-in one (if enabled) with the price file merged over it.
    pub fn prices(&self) -> Result<PriceTable, CostConfigError> {
        let mut table = if self.builtin_prices {
            PriceTable::builtin()
        } else {
            PriceTable::new()
        };
        if let Some(path) = &self.prices_file {
            let text =
                std::fs::read_to_string(path).map_err(|source| CostConfigError::PricesFile {
                    path: path.clone(),
                    source,
                })?;
            let report = table.merge_litellm_json(&text)?;
            for (model, why) in &report.skipped {
                tracing::debug!(target: "palisade::cost", model, why, "price entry skipped");
            }
            tracing::info!(target: "palisade::cost", loaded = report.loaded,
                skipped = report.skipped.len(), path = %path.display(), "price map merged");
        }
        Ok(table)
    }

    /// Builds the layer, recording into `recorder`.
    pub fn build(&self, recorder: UsageRecorder) -> Result<CostMeterLayer, CostConfigError> {
        let checked = self.check()?;
        Ok(self.assemble(checked, recorder))
    }

    /// Starts a recorder feeding `sink` (inside a tokio runtime) and builds the layer. A
    /// bad configuration is reported before any task is started.
    pub fn spawn<S: UsageSink>(
        &self,
        sink: S,
    ) -> Result<(CostMeterLayer, RecorderShutdown), CostConfigError> {
        let checked = self.check()?;
        let (recorder, shutdown) = UsageRecorder::spawn(sink, self.queue);
        Ok((self.assemble(checked, recorder), shutdown))
    }

    pub(crate) fn check(&self) -> Result<Checked, CostConfigError> {
        for (field, v) in [
            ("max_json_body", self.max_json_body),
            ("max_sse_line", self.max_sse_line),
            ("queue.capacity", self.queue.capacity),
            ("queue.max_batch", self.queue.max_batch),
        ] {
            if v == 0 {
                return Err(CostConfigError::Zero(field));
            }
        }
        Ok(Checked {
            user: header("user_header", &self.user_header)?,
            bot: header("bot_header", &self.bot_header)?,
            conversation: header("conversation_header", &self.conversation_header)?,
            request_id: header("request_id_header", &self.request_id_header)?,
            prices: Arc::new(self.prices()?),
        })
    }

    pub(crate) fn assemble(&self, c: Checked, recorder: UsageRecorder) -> CostMeterLayer {
        CostMeterLayer::new(c.prices, recorder)
            .user_header(c.user)
            .bot_header(c.bot)
            .conversation_header(c.conversation)
            .request_id_header(c.request_id)
            .hash_api_key(self.hash_api_key)
            .user_from_body(self.user_from_body)
            .cost_headers(self.headers.then_some(self.headers_max_body))
            .sse_cost_comment(self.sse_comment)
            .max_json_body(self.max_json_body)
            .max_sse_line(self.max_sse_line)
    }
}

pub(crate) struct Checked {
    user: Option<HeaderName>,
    bot: Option<HeaderName>,
    conversation: Option<HeaderName>,
    request_id: Option<HeaderName>,
    pub(crate) prices: Arc<PriceTable>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_reports_every_problem() {
        let mut env = Env::from_pairs([
            ("PALISADE_COST_USER_HEADER", "bad header"),
            ("PALISADE_COST_MAX_JSON_BODY", "0"),
            ("PALISADE_COST_SSE_COMMENT", "maybe"),
            ("PALISADE_COST_QUEUE_RETRY_BACKOFF", "soon"),
            ("PALISADE_COST_BATCH_SIZE", "5"),
        ]);
        let _ = CostConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        assert_eq!(err.problems().len(), 5, "{err}");
        assert!(
            err.to_string()
                .contains("renamed to PALISADE_COST_QUEUE_MAX_BATCH")
        );
    }

    /// A price file that cannot be read was a problem only once every other variable was
    /// right (`CostMeterLayer::from_env` checked it after the rest), or, through
    /// `CostConfig::from_env`, only when the layer was built: never with the rest. It is
    /// read and checked where it is read, as the budget layer's is.
    #[test]
    fn env_reports_a_missing_or_malformed_price_file_with_the_rest() {
        let bad = std::env::temp_dir().join(format!(
            "palisade-cost-bad-prices-{}.json",
            std::process::id()
        ));
        std::fs::write(&bad, "not json").unwrap();
        for path in [PathBuf::from("/nonexistent/prices.json"), bad.clone()] {
            let mut env = Env::from_pairs([
                ("PALISADE_COST_PRICES_FILE", path.to_str().unwrap()),
                ("PALISADE_COST_SSE_COMMENT", "maybe"),
            ]);
            let _ = CostConfig::from_env(&mut env);
            let err = env.finish().unwrap_err();
            let mut names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
            names.sort_unstable();
            assert_eq!(
                names,
                ["PALISADE_COST_PRICES_FILE", "PALISADE_COST_SSE_COMMENT"],
                "{err}"
            );
        }
        std::fs::remove_file(&bad).unwrap();
    }

    #[test]
    fn env_values() {
        let prices = std::env::temp_dir().join(format!(
            "palisade-cost-env-prices-{}.json",
            std::process::id()
        ));
        std::fs::write(&prices, "{}").unwrap();
        let mut env = Env::from_pairs([
            ("PALISADE_COST_USER_HEADER", "X-End-User"),
            ("PALISADE_COST_CONVERSATION_HEADER", "none"),
            ("PALISADE_COST_HEADERS", "true"),
            ("PALISADE_COST_QUEUE_MAX_BATCH", "7"),
            ("PALISADE_COST_QUEUE_CAPACITY", "5"),
            ("PALISADE_COST_QUEUE_RETRY_BACKOFF", "1s"),
            ("PALISADE_COST_PRICES_FILE", prices.to_str().unwrap()),
        ]);
        let cfg = CostConfig::from_env(&mut env);
        std::fs::remove_file(&prices).unwrap();
        env.finish().unwrap();
        assert_eq!(cfg.user_header.as_deref(), Some("x-end-user"));
        assert_eq!(cfg.conversation_header, None);
        assert!(cfg.headers);
        assert_eq!(cfg.queue.max_batch, 7);
        assert_eq!(cfg.queue.capacity, 5);
        assert_eq!(cfg.queue.retry_backoff, std::time::Duration::from_secs(1));
        assert_eq!(cfg.prices_file, Some(prices));
    }

    #[test]
    fn serde_round_trip_and_defaults() {
        let cfg: CostConfig = toml::from_str(
            "sse_comment = true\n[queue]\ncapacity = 10\nretry_backoff = \"250ms\"\n",
        )
        .unwrap();
        assert!(cfg.sse_comment);
        assert_eq!(cfg.queue.capacity, 10);
        assert_eq!(cfg.queue.max_batch, 256);
        assert_eq!(cfg.user_header, None, "user header attribution is opt-in");
        let back: CostConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }

    #[tokio::test]
    async fn price_file_is_merged_over_the_builtin_table() {
        let path =
            std::env::temp_dir().join(format!("palisade-cost-prices-{}.json", std::process::id()));
        std::fs::write(
            &path,
            r#"{"claude-3-7-sonnet": {"input_cost_per_token": 6e-06, "output_cost_per_token": 3e-05},
                "house-model": {"input_cost_per_token": "0.000001", "output_cost_per_token": "0.000002"}}"#,
        )
        .unwrap();
        let cfg = CostConfig {
            prices_file: Some(path.clone()),
            ..CostConfig::default()
        };
        let table = cfg.prices().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            table.get("claude-3-7-sonnet-latest").unwrap().base.input,
            6_000_000
        );
        assert_eq!(table.get("house-model").unwrap().base.output, 2_000_000);
        assert_eq!(table.get("claude-opus-4-7").unwrap().base.input, 5_000_000);
        let cfg = CostConfig {
            builtin_prices: false,
            ..CostConfig::default()
        };
        assert!(cfg.prices().unwrap().is_empty());
    }

    #[tokio::test]
    async fn invalid_configs_are_errors() {
        let cfg = CostConfig {
            bot_header: Some("bad header".into()),
            ..CostConfig::default()
        };
        let err = cfg.spawn(super::super::MemorySink::new()).unwrap_err();
        assert!(matches!(
            err,
            CostConfigError::InvalidHeaderName {
                field: "bot_header",
                ..
            }
        ));
        let cfg = CostConfig {
            max_sse_line: 0,
            ..CostConfig::default()
        };
        assert!(matches!(
            cfg.spawn(super::super::MemorySink::new()),
            Err(CostConfigError::Zero("max_sse_line"))
        ));
        let cfg = CostConfig {
            prices_file: Some("/nonexistent/palisade/prices.json".into()),
            ..CostConfig::default()
        };
        assert!(matches!(
            cfg.spawn(super::super::MemorySink::new()),
            Err(CostConfigError::PricesFile { .. })
        ));
    }
}
