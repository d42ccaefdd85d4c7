//! [`SecurityHeadersConfig`]: the layer's configuration from files or environment
//! variables.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::builder::{
    SecurityHeadersConfigError, SecurityHeadersLayerBuilder, check_removed_header,
};
use super::csp::{ContentSecurityPolicy, check_report_to, check_report_uri};
use super::layer::SecurityHeadersLayer;
use super::values::{
    CrossOriginEmbedderPolicy, CrossOriginOpenerPolicy, CrossOriginResourcePolicy, FrameOptions,
    HeaderMode, Hsts, HstsWhen, PermissionsPolicy, ReferrerPolicy, SecurityHeader, XssProtection,
};
use crate::config::{Env, Environment, ParseChoiceError, ProblemKind, env_var};

/// Which preset the configuration starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// [`SecurityHeadersLayerBuilder::api`] (the default).
    #[default]
    Api,
    /// [`SecurityHeadersLayerBuilder::web`].
    Web,
}

impl FromStr for Preset {
    type Err = ParseChoiceError;

    fn from_str(s: &str) -> Result<Self, ParseChoiceError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "api" => Ok(Preset::Api),
            "web" => Ok(Preset::Web),
            _ => Err(ParseChoiceError::new(s, "`api` or `web`")),
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Preset::Api => "api",
            Preset::Web => "web",
        })
    }
}

/// Configuration of the security headers layer.
///
/// Every field has a default; an empty file gives the API preset.
///
/// ```
/// use palisade::security_headers::{SecurityHeadersConfig, SecurityHeadersLayer};
///
/// let cfg: SecurityHeadersConfig = toml::from_str(r#"
///     preset = "web"
///     environment = "production"
///     hsts_max_age = "365d"
///     hsts_preload = true
///     csp_report_uri = "/csp-reports"
///     remove_headers = ["server", "x-powered-by"]
///     [modes]
///     x-frame-options = "off"
/// "#).unwrap();
/// let layer = SecurityHeadersLayer::from_config(cfg).unwrap();
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SecurityHeadersConfig {
    /// The preset to start from: `api` or `web`.
    pub preset: Preset,
    /// The mode of every header without a mode of its own.
    pub mode: HeaderMode,
    /// Per-header modes, by header name (`x-frame-options = "off"`).
    pub modes: BTreeMap<String, HeaderMode>,
    /// A Content-Security-Policy replacing the preset's, as written in the header; `off`
    /// sends none.
    pub csp: Option<String>,
    /// Send the policy as `Content-Security-Policy-Report-Only`.
    pub csp_report_only: bool,
    /// Add a per-request nonce (default: the preset's choice, on for `web`).
    pub csp_nonce: Option<bool>,
    /// A `report-uri` for violation reports.
    pub csp_report_uri: Option<String>,
    /// A `report-to` group for violation reports.
    pub csp_report_to: Option<String>,
    /// When HSTS is sent: `auto` (production or https), `always` or `never`.
    pub hsts: HstsWhen,
    /// HSTS `max-age`.
    #[serde(with = "crate::config::duration")]
    pub hsts_max_age: Duration,
    /// HSTS `includeSubDomains`.
    pub hsts_include_subdomains: bool,
    /// HSTS `preload`.
    pub hsts_preload: bool,
    /// The environment (HSTS is sent on every response in production under `auto`).
    pub environment: Environment,
    /// Trust `X-Forwarded-Proto` (or RFC 7239 `Forwarded: proto=`) to tell whether a request
    /// came over https.
    pub trust_forwarded_proto: bool,
    /// `X-Frame-Options`: `DENY` or `SAMEORIGIN`.
    pub frame_options: FrameOptions,
    /// `Referrer-Policy` (default: the preset's).
    pub referrer_policy: Option<ReferrerPolicy>,
    /// A `Permissions-Policy` replacing the default that denies powerful features.
    pub permissions_policy: Option<String>,
    /// `Cross-Origin-Opener-Policy`.
    pub cross_origin_opener_policy: CrossOriginOpenerPolicy,
    /// `Cross-Origin-Resource-Policy`.
    pub cross_origin_resource_policy: CrossOriginResourcePolicy,
    /// `Cross-Origin-Embedder-Policy` (default: not sent).
    pub cross_origin_embedder_policy: Option<CrossOriginEmbedderPolicy>,
    /// `X-XSS-Protection`: `0` (recommended) or `1; mode=block`.
    pub xss_protection: XssProtection,
    /// Send `Cache-Control: no-store`.
    pub cache_control_no_store: bool,
    /// Headers to remove from responses (default: `server`, `x-powered-by` and other
    /// fingerprinting headers).
    pub remove_headers: Option<Vec<String>>,
}

impl Default for SecurityHeadersConfig {
    fn default() -> Self {
        let hsts = Hsts::default();
        Self {
            preset: Preset::Api,
            mode: HeaderMode::IfNotPresent,
            modes: BTreeMap::new(),
            csp: None,
            csp_report_only: false,
            csp_nonce: None,
            csp_report_uri: None,
            csp_report_to: None,
            hsts: HstsWhen::Auto,
            hsts_max_age: hsts.max_age,
            hsts_include_subdomains: hsts.include_subdomains,
            hsts_preload: hsts.preload,
            environment: Environment::Development,
            trust_forwarded_proto: false,
            frame_options: FrameOptions::Deny,
            referrer_policy: None,
            permissions_policy: None,
            cross_origin_opener_policy: CrossOriginOpenerPolicy::SameOrigin,
            cross_origin_resource_policy: CrossOriginResourcePolicy::SameOrigin,
            cross_origin_embedder_policy: None,
            xss_protection: XssProtection::Disabled,
            cache_control_no_store: false,
            remove_headers: None,
        }
    }
}

/// The prefix of the layer's environment variables; each name is
/// [`env_var`]`(PREFIX, field)`.
pub(crate) const PREFIX: &str = "PALISADE_SECURITY_HEADERS";

fn var(field: &str) -> String {
    env_var(PREFIX, field)
}

fn optional<T: FromStr>(env: &mut Env, field: &str, example: &str) -> Option<T>
where
    T::Err: fmt::Display,
{
    env.optional_with(&var(field), None, example, |s| {
        s.trim()
            .parse()
            .map(Some)
            .map_err(|e: T::Err| e.to_string())
    })
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One problem with one field of a [`SecurityHeadersConfig`]: the field, the value that is
/// wrong, and why.
struct FieldProblem {
    field: &'static str,
    value: String,
    error: SecurityHeadersConfigError,
}

impl SecurityHeadersConfig {
    /// Reads `PALISADE_SECURITY_HEADERS_*` variables (and `PALISADE_ENV` for the
    /// environment), recording every problem in `env`, including those that would
    /// otherwise surface only when the layer is built (a bad report URI, report-to group
    /// or header to remove, `preload` with a short `max-age`). Each variable is named
    /// [`env_var`]`("PALISADE_SECURITY_HEADERS", field)`:
    ///
    /// `PRESET`, `MODE`, `MODES` (`x-frame-options=off,content-security-policy=override`),
    /// `CSP`, `CSP_REPORT_ONLY`, `CSP_NONCE`, `CSP_REPORT_URI`, `CSP_REPORT_TO`, `HSTS`,
    /// `HSTS_MAX_AGE`, `HSTS_INCLUDE_SUBDOMAINS`, `HSTS_PRELOAD`, `TRUST_FORWARDED_PROTO`,
    /// `FRAME_OPTIONS`, `REFERRER_POLICY`, `PERMISSIONS_POLICY`,
    /// `CROSS_ORIGIN_OPENER_POLICY`, `CROSS_ORIGIN_RESOURCE_POLICY`,
    /// `CROSS_ORIGIN_EMBEDDER_POLICY`, `XSS_PROTECTION`, `CACHE_CONTROL_NO_STORE`,
    /// `REMOVE_HEADERS` (comma-separated; `none` removes nothing).
    ///
    /// ```
    /// use palisade::config::Env;
    /// use palisade::security_headers::{HstsWhen, SecurityHeadersConfig};
    ///
    /// let mut env = Env::from_pairs([
    ///     ("PALISADE_SECURITY_HEADERS_HSTS", "always"),
    ///     ("PALISADE_SECURITY_HEADERS_CSP", "default-src self"),
    ///     ("PALISADE_SECURITY_HEADERS_HSTS_MAX_AGE", "soon"),
    ///     ("PALISADE_SECURITY_HEADERS_CSP_REPORT_URI", "javascript:alert(1)"),
    /// ]);
    /// let cfg = SecurityHeadersConfig::from_env(&mut env);
    /// assert_eq!(cfg.hsts, HstsWhen::Always);
    /// let err = env.finish().unwrap_err();
    /// // the unquoted 'self', the duration and the report URI
    /// assert_eq!(err.problems().len(), 3);
    /// ```
    pub fn from_env(env: &mut Env) -> Self {
        let d = Self::default();
        let environment = Environment::from_env(env);
        let modes = env.optional_with(&var("modes"), BTreeMap::new(), "x-frame-options=off", |s| {
            let mut map = BTreeMap::new();
            for item in list(s) {
                let (name, mode) = item
                    .split_once('=')
                    .ok_or_else(|| format!("{item:?} is not header=mode"))?;
                let name = name.trim().to_ascii_lowercase();
                if super::values::SecurityHeader::from_name(&name).is_none() {
                    return Err(format!("{name:?} is not a managed header"));
                }
                map.insert(name, mode.parse::<HeaderMode>().map_err(|e| e.to_string())?);
            }
            Ok(map)
        });
        let csp = env.optional_with(
            &var("csp"),
            None,
            "default-src 'none'; frame-ancestors 'none'",
            |s| {
                if s.trim().eq_ignore_ascii_case("off") {
                    return Ok(Some("off".to_owned()));
                }
                s.parse::<ContentSecurityPolicy>()
                    .map(|_| Some(s.trim().to_owned()))
                    .map_err(|e| e.to_string())
            },
        );
        let permissions_policy = env.optional_with(
            &var("permissions_policy"),
            None,
            "camera=(), microphone=(), geolocation=()",
            |s| {
                s.parse::<PermissionsPolicy>()
                    .map(|_| Some(s.trim().to_owned()))
                    .map_err(|e| e.to_string())
            },
        );
        let remove_headers = env.raw(&var("remove_headers")).map(|s| {
            if s.trim().eq_ignore_ascii_case("none") {
                Vec::new()
            } else {
                list(s)
            }
        });
        let config = Self {
            preset: env.optional(&var("preset"), d.preset, "web"),
            mode: env.optional(&var("mode"), d.mode, "override"),
            modes,
            csp,
            csp_report_only: env.optional(&var("csp_report_only"), d.csp_report_only, "true"),
            csp_nonce: optional(env, "csp_nonce", "true"),
            csp_report_uri: optional(env, "csp_report_uri", "/csp-reports"),
            csp_report_to: optional(env, "csp_report_to", "csp-endpoint"),
            hsts: env.optional(&var("hsts"), d.hsts, "auto"),
            hsts_max_age: env.duration(&var("hsts_max_age"), d.hsts_max_age, "730d"),
            hsts_include_subdomains: env.optional(
                &var("hsts_include_subdomains"),
                d.hsts_include_subdomains,
                "true",
            ),
            hsts_preload: env.optional(&var("hsts_preload"), d.hsts_preload, "false"),
            environment,
            trust_forwarded_proto: env.optional(
                &var("trust_forwarded_proto"),
                d.trust_forwarded_proto,
                "true",
            ),
            frame_options: env.optional(&var("frame_options"), d.frame_options, "DENY"),
            referrer_policy: optional(env, "referrer_policy", "no-referrer"),
            permissions_policy,
            cross_origin_opener_policy: env.optional(
                &var("cross_origin_opener_policy"),
                d.cross_origin_opener_policy,
                "same-origin",
            ),
            cross_origin_resource_policy: env.optional(
                &var("cross_origin_resource_policy"),
                d.cross_origin_resource_policy,
                "same-origin",
            ),
            cross_origin_embedder_policy: optional(
                env,
                "cross_origin_embedder_policy",
                "require-corp",
            ),
            xss_protection: env.optional(&var("xss_protection"), d.xss_protection, "0"),
            cache_control_no_store: env.optional(
                &var("cache_control_no_store"),
                d.cache_control_no_store,
                "true",
            ),
            remove_headers,
        };
        config.record_problems(env);
        config
    }

    /// Records in `env` what building the layer would refuse, once per value, skipping
    /// variables whose own value was already refused.
    fn record_problems(&self, env: &mut Env) {
        let mut problems = self.field_problems();
        if problems.is_empty() {
            // The checks by field cover every mistake `build` knows of; should a
            // combination still fail, it is reported rather than found at start-up.
            if let Err(error) = self.build() {
                problems.push(FieldProblem {
                    field: "csp",
                    value: self.csp.clone().unwrap_or_default(),
                    error,
                });
            }
        }
        let already: Vec<String> = env.problems().iter().map(|p| p.name.clone()).collect();
        for FieldProblem {
            field,
            value,
            error,
        } in problems
        {
            let name = var(field);
            if already.contains(&name) {
                continue;
            }
            let example = match field {
                "csp_report_uri" => "/csp-reports",
                "csp_report_to" => "csp-endpoint",
                "remove_headers" => "server,x-powered-by",
                "hsts_preload" => "false (or HSTS_MAX_AGE=365d with HSTS_INCLUDE_SUBDOMAINS=true)",
                "modes" => "x-frame-options=off",
                "permissions_policy" => "camera=(), microphone=(), geolocation=()",
                _ => "default-src 'none'; frame-ancestors 'none'",
            };
            let kind = ProblemKind::Invalid {
                value,
                reason: error.to_string(),
            };
            env.problem(&name, kind, example);
        }
    }

    /// Every mistake `build` would find, each checked on its own so that all of them are
    /// found at once.
    fn field_problems(&self) -> Vec<FieldProblem> {
        let mut out = Vec::new();
        let mut push = |field, value: &str, error| {
            out.push(FieldProblem {
                field,
                value: value.to_owned(),
                error,
            });
        };
        for name in self.modes.keys() {
            if SecurityHeader::from_name(name).is_none() {
                let error = SecurityHeadersConfigError::UnknownHeader { name: name.clone() };
                push("modes", name, error);
            }
        }
        if let Some(text) = self.csp.as_deref().map(str::trim) {
            if !text.eq_ignore_ascii_case("off") {
                if let Err(err) = text.parse::<ContentSecurityPolicy>() {
                    push("csp", text, err.into());
                }
            }
        }
        if let Some(uri) = &self.csp_report_uri {
            if let Err(err) = check_report_uri(uri) {
                push("csp_report_uri", uri, err.into());
            }
        }
        if let Some(group) = &self.csp_report_to {
            if let Err(err) = check_report_to(group) {
                push("csp_report_to", group, err.into());
            }
        }
        if let Some(text) = &self.permissions_policy {
            if let Err(error) = text.parse::<PermissionsPolicy>() {
                push("permissions_policy", text, error);
            }
        }
        let hsts = Hsts {
            max_age: self.hsts_max_age,
            include_subdomains: self.hsts_include_subdomains,
            preload: self.hsts_preload,
        };
        if let Err(error) = hsts.validate() {
            push("hsts_preload", "true", error);
        }
        for name in self.remove_headers.iter().flatten() {
            let lower = name.trim().to_ascii_lowercase();
            if let Err(err) = check_removed_header(&lower) {
                push("remove_headers", name, err);
            }
        }
        out
    }

    /// The builder this configuration describes (mistakes surface in its `build`).
    pub fn builder(&self) -> SecurityHeadersLayerBuilder {
        let mut b = match self.preset {
            Preset::Api => SecurityHeadersLayerBuilder::api(),
            Preset::Web => SecurityHeadersLayerBuilder::web(),
        };
        b = b.mode(self.mode);
        for (name, mode) in &self.modes {
            b = b.header_mode_by_name(name, *mode);
        }
        let csp = match self.csp.as_deref().map(str::trim) {
            Some(off) if off.eq_ignore_ascii_case("off") => None,
            Some(text) => match text.parse::<ContentSecurityPolicy>() {
                Ok(csp) => Some(csp),
                Err(err) => return b.error(SecurityHeadersConfigError::Csp(err)),
            },
            None => b.csp.clone(),
        };
        b = match csp {
            None => b.no_csp(),
            Some(csp) => {
                let mut cb = csp.to_builder().report_only(self.csp_report_only);
                if let Some(nonce) = self.csp_nonce {
                    cb = cb.nonce(nonce);
                }
                if let Some(uri) = &self.csp_report_uri {
                    cb = cb.report_uri(uri);
                }
                if let Some(group) = &self.csp_report_to {
                    cb = cb.report_to(group);
                }
                match cb.build() {
                    Ok(csp) => b.csp(csp),
                    Err(err) => b.error(SecurityHeadersConfigError::Csp(err)),
                }
            }
        };
        if let Some(text) = &self.permissions_policy {
            b = match text.parse::<PermissionsPolicy>() {
                Ok(policy) => b.permissions_policy(policy),
                Err(err) => b.error(err),
            };
        }
        if let Some(referrer) = self.referrer_policy {
            b = b.referrer_policy(referrer);
        }
        if let Some(names) = &self.remove_headers {
            b = b.remove_headers(names);
        }
        b.hsts(Hsts {
            max_age: self.hsts_max_age,
            include_subdomains: self.hsts_include_subdomains,
            preload: self.hsts_preload,
        })
        .hsts_when(self.hsts)
        .environment(self.environment)
        .trust_forwarded_proto(self.trust_forwarded_proto)
        .frame_options(self.frame_options)
        .cross_origin_opener_policy(self.cross_origin_opener_policy)
        .cross_origin_resource_policy(self.cross_origin_resource_policy)
        .cross_origin_embedder_policy(self.cross_origin_embedder_policy)
        .xss_protection(self.xss_protection)
        .cache_control_no_store(self.cache_control_no_store)
    }

    /// Builds the layer (the same as [`SecurityHeadersLayer::from_config`]).
    pub fn build(&self) -> Result<SecurityHeadersLayer, SecurityHeadersConfigError> {
        self.builder().build()
    }
}
