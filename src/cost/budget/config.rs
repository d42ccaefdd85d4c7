//! [`BudgetConfig`]: the budget layer's settings from files or `PALISADE_BUDGET_*`
//! variables.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::estimate::Assumptions;
use super::layer::{BudgetConfigError, BudgetLayer};
use super::{Budget, Period, Scope};
use crate::config::{Env, ProblemKind, env_var};
use crate::cost::pricing::{Money, PriceTable};
use crate::error::ErrorFormat;

const PREFIX: &str = "PALISADE_BUDGET";
const RULES_EXAMPLE: &str = r#"[{"name":"daily","scope":"user","period":"day","limit":"5"}]"#;

/// One budget as configured: the limit is a dollar amount written in decimal (`"5"`,
/// `"0.25"`), thresholds are fractions of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetRuleConfig {
    /// The budget's name (unique).
    pub name: String,
    /// `global`, `user`, `api_key` or `bot`.
    pub scope: Scope,
    /// `day`, `month` or a rolling duration (`24h`).
    pub period: Period,
    /// The limit in dollars, as decimal text.
    pub limit: String,
    /// Alert thresholds, fractions 0–1 (default 0.5, 0.8, 1).
    #[serde(default = "default_thresholds")]
    pub thresholds: Vec<f64>,
}

fn default_thresholds() -> Vec<f64> {
    vec![0.5, 0.8, 1.0]
}

impl BudgetRuleConfig {
    /// The budget, or why not.
    pub fn to_budget(&self) -> Result<Budget, String> {
        let limit = Money::parse_dollars(&self.limit).map_err(|e| format!("limit: {e}"))?;
        if let Some(t) = self.thresholds.iter().find(|t| !(**t > 0.0 && **t <= 1.0)) {
            return Err(format!("threshold {t} is not a fraction in (0, 1]"));
        }
        Ok(
            Budget::new(self.name.as_str(), self.scope, self.period, limit)
                .thresholds(self.thresholds.iter().copied()),
        )
    }
}

/// Settings of [`BudgetLayer`].
///
/// ```
/// use palisade::config::Env;
/// use palisade::cost::budget::{BudgetConfig, BudgetLayer};
///
/// let mut env = Env::from_pairs([
///     ("PALISADE_BUDGET_RULES", r#"[{"name":"daily","scope":"user","period":"day","limit":"5"}]"#),
///     ("PALISADE_ERROR_FORMAT", "anthropic"),
/// ]);
/// let cfg = BudgetConfig::from_env(&mut env);
/// env.finish().unwrap();
/// assert_eq!(cfg.rules[0].limit, "5");
/// let layer = BudgetLayer::from_config(cfg).unwrap();
/// # drop(layer);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BudgetConfig {
    /// The budgets.
    pub rules: Vec<BudgetRuleConfig>,
    /// The refusal status (429 by default).
    pub status: u16,
    /// How refusals are rendered; `None`: the shared `PALISADE_ERROR_FORMAT`.
    pub error_format: Option<ErrorFormat>,
    /// The largest request body read for the estimate, in bytes.
    pub max_body: usize,
    /// Bytes of request body counted as one input token.
    pub bytes_per_token: u64,
    /// Output tokens reserved when a request sets no limit.
    pub default_max_tokens: u64,
    /// Searches (fetches) reserved for a web search (web fetch) tool without `max_uses`
    /// ([`BudgetLayerBuilder::default_max_uses`](super::BudgetLayerBuilder::default_max_uses)).
    pub default_max_uses: u64,
    /// Input tokens reserved for each web search a request allows
    /// ([`BudgetLayerBuilder::tokens_per_web_search`](super::BudgetLayerBuilder::tokens_per_web_search)).
    pub tokens_per_web_search: u64,
    /// Input tokens reserved for each fetch of a web fetch tool without
    /// `max_content_tokens`
    /// ([`BudgetLayerBuilder::tokens_per_web_fetch`](super::BudgetLayerBuilder::tokens_per_web_fetch)).
    pub tokens_per_web_fetch: u64,
    /// Let models without a price pass unchecked.
    pub allow_unpriced: bool,
    /// Let requests pass unchecked when the store fails.
    pub fail_open: bool,
    /// A LiteLLM-style JSON price map merged over the built-in table.
    pub prices_file: Option<PathBuf>,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            status: 429,
            error_format: None,
            max_body: 4 << 20,
            bytes_per_token: Assumptions::DEFAULT.bytes_per_token,
            default_max_tokens: Assumptions::DEFAULT.default_max_tokens,
            default_max_uses: Assumptions::DEFAULT.default_max_uses,
            tokens_per_web_search: Assumptions::DEFAULT.tokens_per_web_search,
            tokens_per_web_fetch: Assumptions::DEFAULT.tokens_per_web_fetch,
            allow_unpriced: false,
            fail_open: false,
            prices_file: None,
        }
    }
}

fn parse_format(s: &str) -> Result<ErrorFormat, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "anthropic" => Ok(ErrorFormat::Anthropic),
        "problem" | "problem_json" | "problem+json" => Ok(ErrorFormat::ProblemJson),
        _ => Err("expected `anthropic` or `problem_json`".to_owned()),
    }
}

impl BudgetConfig {
    /// Reads every field from `PALISADE_BUDGET_<FIELD>` (names by
    /// [`env_var`](crate::config::env_var)), recording every problem in `env`:
    ///
    /// | variable | example |
    /// |---|---|
    /// | `PALISADE_BUDGET_RULES` | `[{"name":"daily","scope":"user","period":"day","limit":"5"}]` (JSON) |
    /// | `PALISADE_BUDGET_STATUS` | `429` |
    /// | `PALISADE_BUDGET_ERROR_FORMAT` | `anthropic` or `problem_json` (else `PALISADE_ERROR_FORMAT`) |
    /// | `PALISADE_BUDGET_MAX_BODY` | `4194304` |
    /// | `PALISADE_BUDGET_BYTES_PER_TOKEN` | `3` |
    /// | `PALISADE_BUDGET_DEFAULT_MAX_TOKENS` | `4096` |
    /// | `PALISADE_BUDGET_DEFAULT_MAX_USES` | `10` |
    /// | `PALISADE_BUDGET_TOKENS_PER_WEB_SEARCH` | `10000` |
    /// | `PALISADE_BUDGET_TOKENS_PER_WEB_FETCH` | `25000` |
    /// | `PALISADE_BUDGET_ALLOW_UNPRICED` | `false` |
    /// | `PALISADE_BUDGET_FAIL_OPEN` | `false` |
    /// | `PALISADE_BUDGET_PRICES_FILE` | `/etc/palisade/prices.json` |
    pub fn from_env(env: &mut Env) -> Self {
        let d = Self::default();
        let v = |f: &str| env_var(PREFIX, f);
        let rules: Vec<BudgetRuleConfig> =
            env.optional_with(&v("rules"), Vec::new(), RULES_EXAMPLE, |s| {
                serde_json::from_str(s).map_err(|e| e.to_string())
            });
        for (i, rule) in rules.iter().enumerate() {
            let checked = rule.to_budget().and_then(|_| {
                if rules[..i].iter().any(|r| r.name == rule.name) {
                    Err(BudgetConfigError::DuplicateName(rule.name.clone()).to_string())
                } else {
                    Ok(())
                }
            });
            if let Err(reason) = checked {
                env.problem(
                    &v("rules"),
                    ProblemKind::Invalid {
                        value: rule.name.clone(),
                        reason,
                    },
                    RULES_EXAMPLE,
                );
            }
        }
        let status = env.optional_with(&v("status"), d.status, "429", |s| {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|n| (400..600).contains(n))
                .ok_or_else(|| "expected an error status, 400–599".to_owned())
        });
        // the shared setting through its one reader, which reports a bad value (once)
        let shared = env
            .raw(crate::config::ERROR_FORMAT_VAR)
            .is_some()
            .then(|| ErrorFormat::from_env(env));
        let error_format = env
            .optional_with(&v("error_format"), None, "anthropic", |s| {
                parse_format(s).map(Some)
            })
            .or(shared);
        let max_body = env.optional(&v("max_body"), d.max_body, "4194304");
        let bytes_per_token = env.optional(&v("bytes_per_token"), d.bytes_per_token, "3");
        let default_max_tokens =
            env.optional(&v("default_max_tokens"), d.default_max_tokens, "4096");
        let default_max_uses = env.optional(&v("default_max_uses"), d.default_max_uses, "10");
        let tokens_per_web_search = env.optional(
            &v("tokens_per_web_search"),
            d.tokens_per_web_search,
            "10000",
        );
        let tokens_per_web_fetch =
            env.optional(&v("tokens_per_web_fetch"), d.tokens_per_web_fetch, "25000");
        let allow_unpriced = env.optional(&v("allow_unpriced"), d.allow_unpriced, "false");
        let fail_open = env.optional(&v("fail_open"), d.fail_open, "false");
        let prices_file =
            env.optional_with(&v("prices_file"), None, "/etc/palisade/prices.json", |s| {
                Ok(Some(PathBuf::from(s.trim())))
            });
        // Read and check the file now, so a missing or malformed one is reported with every
        // other problem, under its own name (building from this config fails too).
        if let Some(path) = &prices_file {
            let checked = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read it: {e}"))
                .and_then(|text| {
                    PriceTable::builtin()
                        .merge_litellm_json(&text)
                        .map_err(|e| e.to_string())
                });
            if let Err(reason) = checked {
                env.problem(
                    &v("prices_file"),
                    ProblemKind::Invalid {
                        value: path.display().to_string(),
                        reason,
                    },
                    "/etc/palisade/prices.json",
                );
            }
        }
        for (field, n) in [
            ("max_body", max_body as u64),
            ("bytes_per_token", bytes_per_token),
        ] {
            if n == 0 {
                env.problem(
                    &v(field),
                    ProblemKind::Invalid {
                        value: "0".into(),
                        reason: "must be greater than 0".into(),
                    },
                    "3",
                );
            }
        }
        Self {
            rules,
            status,
            error_format,
            max_body,
            bytes_per_token,
            default_max_tokens,
            default_max_uses,
            tokens_per_web_search,
            tokens_per_web_fetch,
            allow_unpriced,
            fail_open,
            prices_file,
        }
    }

    /// The layer builder this configuration describes (add an alert sink or a store to it).
    pub fn builder(&self) -> Result<super::BudgetLayerBuilder, BudgetConfigError> {
        let mut prices = PriceTable::builtin();
        if let Some(path) = &self.prices_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| BudgetConfigError::Prices(format!("{}: {e}", path.display())))?;
            prices
                .merge_litellm_json(&text)
                .map_err(|e| BudgetConfigError::Prices(e.to_string()))?;
        }
        let mut b = BudgetLayer::builder()
            .prices(prices)
            .refusal_status(self.status)
            .error_format(self.error_format.unwrap_or_default())
            .max_body(self.max_body)
            .bytes_per_token(self.bytes_per_token)
            .default_max_tokens(self.default_max_tokens)
            .default_max_uses(self.default_max_uses)
            .tokens_per_web_search(self.tokens_per_web_search)
            .tokens_per_web_fetch(self.tokens_per_web_fetch)
            .allow_unpriced(self.allow_unpriced)
            .fail_open(self.fail_open);
        for rule in &self.rules {
            let budget = rule.to_budget().map_err(|reason| BudgetConfigError::Rule {
                name: rule.name.clone(),
                reason,
            })?;
            b = b.budget(budget);
        }
        Ok(b)
    }
}

impl BudgetLayer {
    /// The layer `config` describes, with the memory store and no alert sink (use
    /// [`BudgetConfig::builder`] to add them).
    pub fn from_config(config: BudgetConfig) -> Result<BudgetLayer, BudgetConfigError> {
        config.builder()?.build()
    }

    /// The layer configured by `PALISADE_BUDGET_*` (and `PALISADE_ERROR_FORMAT`), with
    /// every problem reported at once.
    pub fn from_env() -> Result<BudgetLayer, crate::config::ConfigError> {
        let mut env = Env::from_process();
        let config = BudgetConfig::from_env(&mut env);
        env.finish()?;
        Self::from_config(config).map_err(|e| {
            let field = match e {
                BudgetConfigError::Prices(_) => "prices_file",
                _ => "rules",
            };
            crate::config::ConfigError::new(vec![crate::config::Problem {
                name: env_var(PREFIX, field),
                kind: ProblemKind::Invalid {
                    value: String::new(),
                    reason: e.to_string(),
                },
                example: RULES_EXAMPLE.to_owned(),
            }])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget layer read the shared setting raw and ignored a bad value, so a typo in
    /// `PALISADE_ERROR_FORMAT` went unreported when the budget layer was its only reader.
    #[test]
    fn a_bad_shared_error_format_is_reported_when_the_budget_layer_reads_it_alone() {
        let mut env = Env::from_pairs([("PALISADE_ERROR_FORMAT", "xml")]);
        let _ = BudgetConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["PALISADE_ERROR_FORMAT"]);

        let mut env = Env::from_pairs([("PALISADE_ERROR_FORMAT", "anthropic")]);
        let config = BudgetConfig::from_env(&mut env);
        env.finish().unwrap();
        assert_eq!(config.error_format, Some(ErrorFormat::Anthropic));

        let mut env = Env::default();
        assert_eq!(BudgetConfig::from_env(&mut env).error_format, None);
        env.finish().unwrap();
    }

    /// Two rules with one name were accepted by `from_env` and refused only when the layer
    /// was built, apart from every other problem (the demo gateway stopped on it alone).
    /// `from_env` reports the name with the rest, as the rate limiter's does.
    #[test]
    fn from_env_reports_two_budgets_of_one_name_with_the_rest() {
        let mut env = Env::from_pairs([
            (
                "PALISADE_BUDGET_RULES",
                r#"[{"name":"daily","scope":"user","period":"day","limit":"5"},
                    {"name":"daily","scope":"global","period":"month","limit":"100"}]"#,
            ),
            ("PALISADE_BUDGET_STATUS", "200"),
        ]);
        let _ = BudgetConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["PALISADE_BUDGET_RULES", "PALISADE_BUDGET_STATUS"],
            "{err}"
        );
        assert!(err.to_string().contains("`daily`"), "{err}");
    }
}
