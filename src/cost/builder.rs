//! [`CostMeterLayerBuilder`], and the layer's `from_config` / `from_env` constructors.

use std::sync::Arc;

use super::config::{CostConfig, CostConfigError, ENV_PREFIX};
use super::layer::CostMeterLayer;
use super::pricing::PriceTable;
use super::sink::UsageRecorder;
use crate::config::{ConfigError, Env, ProblemKind, env_var};

/// Builds a [`CostMeterLayer`], checking every setting: see
/// [`CostMeterLayer::builder`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct CostMeterLayerBuilder {
    config: CostConfig,
    prices: Option<Arc<PriceTable>>,
    recorder: Option<UsageRecorder>,
}

impl CostMeterLayer {
    /// A builder starting from the default settings ([`CostConfig::default`]).
    ///
    /// ```
    /// use palisade::cost::{CostMeterLayer, CostConfigError, MemorySink, RecorderConfig, UsageRecorder};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let (recorder, shutdown) = UsageRecorder::spawn(MemorySink::new(), RecorderConfig::default());
    /// let layer = CostMeterLayer::builder()
    ///     .recorder(recorder)
    ///     .sse_comment(true)
    ///     .bot_header(None)
    ///     .build()
    ///     .unwrap();
    /// # drop(layer);
    /// let err = CostMeterLayer::builder().build().unwrap_err();
    /// assert!(matches!(err, CostConfigError::MissingRecorder));
    /// shutdown.shutdown().await;
    /// # }
    /// ```
    pub fn builder() -> CostMeterLayerBuilder {
        CostMeterLayerBuilder::default()
    }

    /// The layer `config` describes, recording into `recorder`. The price table is the
    /// built-in one and/or the config's price file.
    pub fn from_config(
        config: CostConfig,
        recorder: UsageRecorder,
    ) -> Result<CostMeterLayer, CostConfigError> {
        config.build(recorder)
    }

    /// The layer the `PALISADE_COST_*` environment variables describe (see
    /// [`CostConfig::from_env`]), recording into `recorder`. Every problem, the price file
    /// included, is reported at once.
    ///
    /// ```
    /// use palisade::cost::{CostMeterLayer, MemorySink, RecorderConfig, UsageRecorder};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let (recorder, shutdown) = UsageRecorder::spawn(MemorySink::new(), RecorderConfig::default());
    /// let layer = CostMeterLayer::from_env(recorder).unwrap();
    /// # drop(layer);
    /// # shutdown.shutdown().await;
    /// # }
    /// ```
    pub fn from_env(recorder: UsageRecorder) -> Result<CostMeterLayer, ConfigError> {
        Self::from_env_in(Env::from_process(), recorder)
    }

    /// Like [`from_env`](Self::from_env), reading `env` instead of the process
    /// environment.
    pub fn from_env_in(
        mut env: Env,
        recorder: UsageRecorder,
    ) -> Result<CostMeterLayer, ConfigError> {
        let config = CostConfig::from_env(&mut env);
        let checked = if env.problems().is_empty() {
            match config.check() {
                Ok(checked) => Some(checked),
                Err(e) => {
                    let name = env_var(ENV_PREFIX, e.field());
                    let value = env.raw(&name).unwrap_or_default().to_owned();
                    let reason = e.to_string();
                    env.problem(
                        &name,
                        ProblemKind::Invalid { value, reason },
                        "/etc/palisade/prices.json",
                    );
                    None
                }
            }
        } else {
            None
        };
        env.finish()?;
        match checked {
            Some(checked) => Ok(config.assemble(checked, recorder)),
            None => Err(ConfigError::new(Vec::new())),
        }
    }
}

impl CostMeterLayerBuilder {
    /// Starts from `config` (replacing every setting made so far).
    pub fn config(mut self, config: CostConfig) -> Self {
        self.config = config;
        self
    }

    /// The price table (default: the built-in one, with the config's price file merged).
    pub fn prices(mut self, prices: impl Into<Arc<PriceTable>>) -> Self {
        self.prices = Some(prices.into());
        self
    }

    /// Where records go (required): see [`UsageRecorder::spawn`].
    pub fn recorder(mut self, recorder: UsageRecorder) -> Self {
        self.recorder = Some(recorder);
        self
    }

    /// The header naming the user, `None` to read none (the default). Client-supplied:
    /// set it only behind a trusted proxy; a [`Principal`](super::Principal) comes first.
    pub fn user_header(mut self, name: Option<&str>) -> Self {
        self.config.user_header = name.map(str::to_owned);
        self
    }

    /// The header naming the bot (default `x-bot-id`), `None` to read none.
    pub fn bot_header(mut self, name: Option<&str>) -> Self {
        self.config.bot_header = name.map(str::to_owned);
        self
    }

    /// The header naming the conversation (default `x-conversation-id`).
    pub fn conversation_header(mut self, name: Option<&str>) -> Self {
        self.config.conversation_header = name.map(str::to_owned);
        self
    }

    /// The header holding the request id (default `x-request-id`).
    pub fn request_id_header(mut self, name: Option<&str>) -> Self {
        self.config.request_id_header = name.map(str::to_owned);
        self
    }

    /// Whether to record the hashed API key (default `true`).
    pub fn hash_api_key(mut self, on: bool) -> Self {
        self.config.hash_api_key = on;
        self
    }

    /// Whether to take the user from the body's top-level `metadata.user_id` (with
    /// [`BodyUserIdLayer`](super::BodyUserIdLayer); default `false`).
    pub fn user_from_body(mut self, on: bool) -> Self {
        self.config.user_from_body = on;
        self
    }

    /// Cost headers on non-streamed JSON responses of at most `max_body` bytes
    /// (`None`, the default: no headers).
    pub fn headers(mut self, max_body: Option<u64>) -> Self {
        self.config.headers = max_body.is_some();
        if let Some(n) = max_body {
            self.config.headers_max_body = n;
        }
        self
    }

    /// Whether to end event streams with a `: palisade-cost …` comment (default `false`).
    pub fn sse_comment(mut self, on: bool) -> Self {
        self.config.sse_comment = on;
        self
    }

    /// The largest JSON body read whole (larger ones are read by their top-level usage).
    pub fn max_json_body(mut self, bytes: usize) -> Self {
        self.config.max_json_body = bytes;
        self
    }

    /// The longest SSE line kept.
    pub fn max_sse_line(mut self, bytes: usize) -> Self {
        self.config.max_sse_line = bytes;
        self
    }

    /// The layer, or what is wrong with the settings.
    pub fn build(self) -> Result<CostMeterLayer, CostConfigError> {
        let recorder = self.recorder.ok_or(CostConfigError::MissingRecorder)?;
        let mut config = self.config;
        if self.prices.is_some() {
            // the table given replaces the built-in one and any price file
            config.prices_file = None;
            config.builtin_prices = false;
        }
        let mut checked = config.check()?;
        if let Some(prices) = self.prices {
            checked.prices = prices;
        }
        Ok(config.assemble(checked, recorder))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::MemorySink;
    use crate::cost::sink::RecorderConfig;

    #[tokio::test]
    async fn builder_checks_every_setting() {
        let (recorder, shutdown) =
            UsageRecorder::spawn(MemorySink::new(), RecorderConfig::default());
        let err = CostMeterLayer::builder()
            .recorder(recorder.clone())
            .user_header(Some("bad header"))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "user_header");
        let err = CostMeterLayer::builder()
            .recorder(recorder.clone())
            .max_sse_line(0)
            .build()
            .unwrap_err();
        assert!(matches!(err, CostConfigError::Zero("max_sse_line")));
        let layer = CostMeterLayer::builder()
            .recorder(recorder)
            .prices(PriceTable::new())
            .build()
            .unwrap();
        assert!(layer.prices().is_empty());
        shutdown.shutdown().await;
    }

    #[tokio::test]
    async fn from_env_reports_every_problem_with_names_from_field_paths() {
        let (recorder, shutdown) =
            UsageRecorder::spawn(MemorySink::new(), RecorderConfig::default());
        let env = Env::from_pairs([
            ("PALISADE_COST_HEADERS", "maybe"),
            ("PALISADE_COST_QUEUE_MAX_BATCH", "0"),
            ("PALISADE_COST_QUEUE_RETRY_BACKOFF", "soon"),
            ("PALISADE_COST_USER_HEADER", "bad header"),
        ]);
        let err = CostMeterLayer::from_env_in(env, recorder.clone()).unwrap_err();
        let mut names: Vec<_> = err.problems().iter().map(|p| p.name.clone()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                env_var(ENV_PREFIX, "headers"),
                env_var(ENV_PREFIX, "queue.max_batch"),
                env_var(ENV_PREFIX, "queue.retry_backoff"),
                env_var(ENV_PREFIX, "user_header"),
            ]
        );
        // A price file that cannot be read is reported under its variable too.
        let env = Env::from_pairs([("PALISADE_COST_PRICES_FILE", "/nonexistent/prices.json")]);
        let err = CostMeterLayer::from_env_in(env, recorder).unwrap_err();
        assert_eq!(err.problems()[0].name, "PALISADE_COST_PRICES_FILE");
        shutdown.shutdown().await;
    }
}
