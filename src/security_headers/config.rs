//! [`SecurityHeadersConfig`]: the layer's configuration from files or environment
//! variables.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::builder::{SecurityHeadersBuilder, SecurityHeadersError};
use super::csp::ContentSecurityPolicy;
use super::layer::SecurityHeadersLayer;
use super::values::{
    CrossOriginEmbedderPolicy, CrossOriginOpenerPolicy, CrossOriginResourcePolicy, FrameOptions,
    HeaderMode, Hsts, HstsWhen, PermissionsPolicy, ReferrerPolicy, XssProtection,
};
use crate::config::{Env, Environment};

/// Which preset the configuration starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// [`SecurityHeadersBuilder::api`] (the default).
    #[default]
    Api,
    /// [`SecurityHeadersBuilder::web`].
    Web,
}

impl FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "api" => Ok(Preset::Api),
            "web" => Ok(Preset::Web),
            _ => Err("expected `api` or `web`".to_owned()),
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
/// let layer = SecurityHeadersLayer::from_config(&cfg).unwrap();
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

const PREFIX: &str = "PALISADE_SECURITY_HEADERS_";

fn var(name: &str) -> String {
    format!("{PREFIX}{name}")
}

fn optional<T: FromStr>(env: &mut Env, name: &str, example: &str) -> Option<T>
where
    T::Err: fmt::Display,
{
    env.optional_with(&var(name), None, example, |s| {
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

impl SecurityHeadersConfig {
    /// Reads `PALISADE_SECURITY_HEADERS_*` variables (and `PALISADE_ENV` for the
    /// environment), recording every problem in `env`:
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
    /// ]);
    /// let cfg = SecurityHeadersConfig::from_env(&mut env);
    /// assert_eq!(cfg.hsts, HstsWhen::Always);
    /// let err = env.finish().unwrap_err();
    /// assert_eq!(err.problems().len(), 2); // the unquoted 'self' and the duration
    /// ```
    pub fn from_env(env: &mut Env) -> Self {
        let d = Self::default();
        let environment = Environment::from_env(env);
        let modes = env.optional_with(&var("MODES"), BTreeMap::new(), "x-frame-options=off", |s| {
            let mut map = BTreeMap::new();
            for item in list(s) {
                let (name, mode) = item
                    .split_once('=')
                    .ok_or_else(|| format!("{item:?} is not header=mode"))?;
                let name = name.trim().to_ascii_lowercase();
                if super::values::SecurityHeader::from_name(&name).is_none() {
                    return Err(format!("{name:?} is not a managed header"));
                }
                map.insert(name, mode.parse::<HeaderMode>()?);
            }
            Ok(map)
        });
        let csp = env.optional_with(
            &var("CSP"),
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
            &var("PERMISSIONS_POLICY"),
            None,
            "camera=(), microphone=(), geolocation=()",
            |s| {
                s.parse::<PermissionsPolicy>()
                    .map(|_| Some(s.trim().to_owned()))
            },
        );
        let remove_headers = env.raw(&var("REMOVE_HEADERS")).map(|s| {
            if s.trim().eq_ignore_ascii_case("none") {
                Vec::new()
            } else {
                list(s)
            }
        });
        Self {
            preset: env.optional(&var("PRESET"), d.preset, "web"),
            mode: env.optional(&var("MODE"), d.mode, "override"),
            modes,
            csp,
            csp_report_only: env.optional(&var("CSP_REPORT_ONLY"), d.csp_report_only, "true"),
            csp_nonce: optional(env, "CSP_NONCE", "true"),
            csp_report_uri: optional(env, "CSP_REPORT_URI", "/csp-reports"),
            csp_report_to: optional(env, "CSP_REPORT_TO", "csp-endpoint"),
            hsts: env.optional(&var("HSTS"), d.hsts, "auto"),
            hsts_max_age: env.duration(&var("HSTS_MAX_AGE"), d.hsts_max_age, "730d"),
            hsts_include_subdomains: env.optional(
                &var("HSTS_INCLUDE_SUBDOMAINS"),
                d.hsts_include_subdomains,
                "true",
            ),
            hsts_preload: env.optional(&var("HSTS_PRELOAD"), d.hsts_preload, "false"),
            environment,
            trust_forwarded_proto: env.optional(
                &var("TRUST_FORWARDED_PROTO"),
                d.trust_forwarded_proto,
                "true",
            ),
            frame_options: env.optional(&var("FRAME_OPTIONS"), d.frame_options, "DENY"),
            referrer_policy: optional(env, "REFERRER_POLICY", "no-referrer"),
            permissions_policy,
            cross_origin_opener_policy: env.optional(
                &var("CROSS_ORIGIN_OPENER_POLICY"),
                d.cross_origin_opener_policy,
                "same-origin",
            ),
            cross_origin_resource_policy: env.optional(
                &var("CROSS_ORIGIN_RESOURCE_POLICY"),
                d.cross_origin_resource_policy,
                "same-origin",
            ),
            cross_origin_embedder_policy: optional(
                env,
                "CROSS_ORIGIN_EMBEDDER_POLICY",
                "require-corp",
            ),
            xss_protection: env.optional(&var("XSS_PROTECTION"), d.xss_protection, "0"),
            cache_control_no_store: env.optional(
                &var("CACHE_CONTROL_NO_STORE"),
                d.cache_control_no_store,
                "true",
            ),
            remove_headers,
        }
    }

    /// The builder this configuration describes (mistakes surface in its `build`).
    pub fn builder(&self) -> SecurityHeadersBuilder {
        let mut b = match self.preset {
            Preset::Api => SecurityHeadersBuilder::api(),
            Preset::Web => SecurityHeadersBuilder::web(),
        };
        b = b.mode(self.mode);
        for (name, mode) in &self.modes {
            b = b.header_mode_by_name(name, *mode);
        }
        let csp = match self.csp.as_deref().map(str::trim) {
            Some(off) if off.eq_ignore_ascii_case("off") => None,
            Some(text) => match text.parse::<ContentSecurityPolicy>() {
                Ok(csp) => Some(csp),
                Err(err) => return b.error(SecurityHeadersError::Csp(err)),
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
                    Err(err) => b.error(SecurityHeadersError::Csp(err)),
                }
            }
        };
        if let Some(text) = &self.permissions_policy {
            b = match text.parse::<PermissionsPolicy>() {
                Ok(policy) => b.permissions_policy(policy),
                Err(reason) => b.error(SecurityHeadersError::PermissionsPolicy { reason }),
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
    pub fn build(&self) -> Result<SecurityHeadersLayer, SecurityHeadersError> {
        self.builder().build()
    }
}
