//! The typed values of the headers the layer sends.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use http::{HeaderName, header};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::builder::SecurityHeadersConfigError;
use crate::config::ParseChoiceError;

macro_rules! value_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident => $value:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        #[non_exhaustive]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
        }

        impl $name {
            /// The header value (as sent).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $value, )*
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        /// Parses the header value, ASCII case-insensitively; `_` may stand for `-`.
        impl FromStr for $name {
            type Err = ParseChoiceError;

            fn from_str(s: &str) -> Result<Self, ParseChoiceError> {
                let s = s.trim();
                $(
                    if s.eq_ignore_ascii_case($value)
                        || s.replace('_', "-").eq_ignore_ascii_case($value)
                    {
                        return Ok($name::$variant);
                    }
                )*
                let expected: &[&str] = &[$($value),*];
                Err(ParseChoiceError::new(
                    s,
                    format!("one of {} for {}", expected.join(", "), $what),
                ))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

value_enum! {
    /// How a header is applied to a response.
    pub enum HeaderMode ("a header mode") {
        /// Set the header, replacing any value the handler set.
        Override => "override",
        /// Set the header only if the handler did not (the default: a handler's own header
        /// wins).
        #[default]
        IfNotPresent => "if-not-present",
        /// Do not send the header.
        Off => "off",
    }
}

value_enum! {
    /// `X-Frame-Options`: whether the response may be shown in a frame.
    pub enum FrameOptions ("X-Frame-Options") {
        /// `DENY`: never (the default).
        #[default]
        Deny => "DENY",
        /// `SAMEORIGIN`: only by pages of the same origin.
        SameOrigin => "SAMEORIGIN",
    }
}

value_enum! {
    /// `Referrer-Policy`: how much of the URL leaves with outgoing requests.
    pub enum ReferrerPolicy ("Referrer-Policy") {
        /// `no-referrer`: nothing (the API preset).
        NoReferrer => "no-referrer",
        /// `no-referrer-when-downgrade` (leaks full URLs cross-origin; not recommended).
        NoReferrerWhenDowngrade => "no-referrer-when-downgrade",
        /// `origin` (sends the origin over http too; not recommended).
        Origin => "origin",
        /// `origin-when-cross-origin` (not recommended).
        OriginWhenCrossOrigin => "origin-when-cross-origin",
        /// `same-origin`: full URL to the same origin, nothing elsewhere.
        SameOrigin => "same-origin",
        /// `strict-origin`: the origin, only over https.
        StrictOrigin => "strict-origin",
        /// `strict-origin-when-cross-origin`: the browsers' default, and the web preset's.
        #[default]
        StrictOriginWhenCrossOrigin => "strict-origin-when-cross-origin",
        /// `unsafe-url`: the full URL everywhere (never use).
        UnsafeUrl => "unsafe-url",
    }
}

value_enum! {
    /// `Cross-Origin-Opener-Policy`: whether cross-origin windows share a browsing context
    /// group with the page.
    pub enum CrossOriginOpenerPolicy ("Cross-Origin-Opener-Policy") {
        /// `same-origin` (the default).
        #[default]
        SameOrigin => "same-origin",
        /// `same-origin-allow-popups`: keeps references to popups it opens (OAuth flows).
        SameOriginAllowPopups => "same-origin-allow-popups",
        /// `unsafe-none`: no isolation.
        UnsafeNone => "unsafe-none",
    }
}

value_enum! {
    /// `Cross-Origin-Resource-Policy`: who may load the response as a subresource.
    pub enum CrossOriginResourcePolicy ("Cross-Origin-Resource-Policy") {
        /// `same-origin` (the default).
        #[default]
        SameOrigin => "same-origin",
        /// `same-site`.
        SameSite => "same-site",
        /// `cross-origin`: anyone (public assets, CDNs).
        CrossOrigin => "cross-origin",
    }
}

value_enum! {
    /// `Cross-Origin-Embedder-Policy` (not sent unless chosen: it breaks pages that embed
    /// cross-origin resources without CORP or CORS).
    pub enum CrossOriginEmbedderPolicy ("Cross-Origin-Embedder-Policy") {
        /// `require-corp`.
        #[default]
        RequireCorp => "require-corp",
        /// `credentialless`.
        Credentialless => "credentialless",
        /// `unsafe-none`.
        UnsafeNone => "unsafe-none",
    }
}

value_enum! {
    /// `X-XSS-Protection`.
    ///
    /// The default is `0`, which turns the legacy XSS auditor off. The auditor (removed
    /// from Chrome, Edge and Safari, never in Firefox) could be abused to delete chosen
    /// scripts from a page and to leak data across origins, so OWASP and helmet recommend
    /// `0` and a Content-Security-Policy instead. `1; mode=block` is kept only for audits
    /// that still demand it; it is not recommended.
    pub enum XssProtection ("X-XSS-Protection") {
        /// `0`: the auditor off (recommended).
        #[default]
        Disabled => "0",
        /// `1; mode=block`: the legacy auditor on (not recommended; see above).
        Block => "1; mode=block",
    }
}

value_enum! {
    /// When `Strict-Transport-Security` is sent.
    pub enum HstsWhen ("HSTS") {
        /// In production, or when the request came over https (the default). The scheme is
        /// read from the request URI, and from `X-Forwarded-Proto` or `Forwarded` only when
        /// trusted.
        #[default]
        Auto => "auto",
        /// On every response.
        Always => "always",
        /// Never.
        Never => "never",
    }
}

/// A `Strict-Transport-Security` policy.
///
/// The default is `max-age=63072000; includeSubDomains` (two years). `preload` asks to be
/// added to the browsers' preload list, which requires at least a year and
/// `includeSubDomains`; [`Hsts::validate`] (and the layer builder) check that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hsts {
    /// How long browsers remember to use https only.
    pub max_age: Duration,
    /// Whether subdomains are covered too.
    pub include_subdomains: bool,
    /// Whether to ask for the preload list.
    pub preload: bool,
}

impl Default for Hsts {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(63_072_000),
            include_subdomains: true,
            preload: false,
        }
    }
}

impl Hsts {
    /// The minimum `max-age` the preload list accepts (one year).
    pub const PRELOAD_MIN_MAX_AGE: Duration = Duration::from_secs(31_536_000);

    /// Checks the preload list's requirements when `preload` is set.
    pub fn validate(&self) -> Result<(), SecurityHeadersConfigError> {
        let refuse = |reason| Err(SecurityHeadersConfigError::HstsPreload { reason });
        if self.preload && !self.include_subdomains {
            return refuse("preload requires includeSubDomains");
        }
        if self.preload && self.max_age < Self::PRELOAD_MIN_MAX_AGE {
            return refuse("preload requires a max-age of at least one year (31536000 seconds)");
        }
        Ok(())
    }
}

impl fmt::Display for Hsts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "max-age={}", self.max_age.as_secs())?;
        if self.include_subdomains {
            f.write_str("; includeSubDomains")?;
        }
        if self.preload {
            f.write_str("; preload")?;
        }
        Ok(())
    }
}

/// The powerful features the default `Permissions-Policy` turns off for the page and
/// everything it embeds.
pub const DENIED_FEATURES: [&str; 22] = [
    "accelerometer",
    "autoplay",
    "bluetooth",
    "camera",
    "display-capture",
    "encrypted-media",
    "fullscreen",
    "geolocation",
    "gyroscope",
    "hid",
    "idle-detection",
    "magnetometer",
    "microphone",
    "midi",
    "payment",
    "picture-in-picture",
    "publickey-credentials-get",
    "screen-wake-lock",
    "serial",
    "usb",
    "web-share",
    "xr-spatial-tracking",
];

/// A `Permissions-Policy`: which powerful browser features the page may use.
///
/// ```
/// use palisade::security_headers::PermissionsPolicy;
///
/// let policy = PermissionsPolicy::deny_all()
///     .allow_self("fullscreen")
///     .allow_origins("payment", ["https://pay.example.com"]);
/// let text = policy.to_string();
/// assert!(text.contains("camera=()"));
/// assert!(text.contains("fullscreen=(self)"));
/// assert!(text.contains(r#"payment=(self "https://pay.example.com")"#));
/// assert_eq!(text.parse::<PermissionsPolicy>().unwrap(), policy);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionsPolicy {
    features: Vec<(String, Vec<String>)>,
}

impl Default for PermissionsPolicy {
    fn default() -> Self {
        Self::deny_all()
    }
}

impl PermissionsPolicy {
    /// Every feature in [`DENIED_FEATURES`] set to `()`.
    pub fn deny_all() -> Self {
        Self {
            features: DENIED_FEATURES
                .iter()
                .map(|f| ((*f).to_owned(), Vec::new()))
                .collect(),
        }
    }

    /// A policy with no feature listed.
    pub fn empty() -> Self {
        Self {
            features: Vec::new(),
        }
    }

    fn set(mut self, feature: &str, allow: Vec<String>) -> Self {
        match self.features.iter_mut().find(|(f, _)| f == feature) {
            Some(slot) => slot.1 = allow,
            None => self.features.push((feature.to_owned(), allow)),
        }
        self
    }

    /// Denies `feature` everywhere (`feature=()`).
    #[must_use]
    pub fn deny(self, feature: &str) -> Self {
        self.set(feature, Vec::new())
    }

    /// Allows `feature` for the page's own origin (`feature=(self)`).
    #[must_use]
    pub fn allow_self(self, feature: &str) -> Self {
        self.set(feature, vec!["self".to_owned()])
    }

    /// Allows `feature` for the page's origin and the given origins
    /// (`feature=(self "https://a.example")`).
    #[must_use]
    pub fn allow_origins<I>(self, feature: &str, origins: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut allow = vec!["self".to_owned()];
        allow.extend(origins.into_iter().map(|o| format!("\"{}\"", o.as_ref())));
        self.set(feature, allow)
    }

    /// Checks feature names and origins.
    pub fn validate(&self) -> Result<(), SecurityHeadersConfigError> {
        self.check()
            .map_err(|reason| SecurityHeadersConfigError::PermissionsPolicy { reason })
    }

    fn check(&self) -> Result<(), String> {
        for (feature, allow) in &self.features {
            if feature.is_empty()
                || !feature
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(format!("feature {feature:?} is not a lowercase token"));
            }
            for item in allow {
                let ok = match item.as_str() {
                    "self" | "*" | "src" => true,
                    quoted => quoted
                        .strip_prefix('"')
                        .and_then(|q| q.strip_suffix('"'))
                        .is_some_and(|origin| {
                            (origin.starts_with("https://") || origin.starts_with("http://"))
                                && origin.bytes().all(|b| {
                                    b.is_ascii_alphanumeric()
                                        || matches!(b, b':' | b'/' | b'.' | b'-' | b'*')
                                })
                        }),
                };
                if !ok {
                    return Err(format!(
                        "{feature}: {item} is not self, * or a quoted http(s) origin"
                    ));
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for PermissionsPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (feature, allow)) in self.features.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{feature}=")?;
            if allow.len() == 1 && allow[0] == "*" {
                f.write_str("*")?;
            } else {
                write!(f, "({})", allow.join(" "))?;
            }
        }
        Ok(())
    }
}

/// Parses `camera=(), fullscreen=(self), payment=(self "https://pay.example.com")`.
impl FromStr for PermissionsPolicy {
    type Err = SecurityHeadersConfigError;

    fn from_str(s: &str) -> Result<Self, SecurityHeadersConfigError> {
        Self::parse(s).map_err(|reason| SecurityHeadersConfigError::PermissionsPolicy { reason })
    }
}

impl PermissionsPolicy {
    fn parse(s: &str) -> Result<Self, String> {
        let mut policy = PermissionsPolicy::empty();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (feature, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not feature=(allowlist)"))?;
            let value = value.trim();
            let allow: Vec<String> = if value == "*" {
                vec!["*".to_owned()]
            } else {
                value
                    .strip_prefix('(')
                    .and_then(|v| v.strip_suffix(')'))
                    .ok_or_else(|| format!("{item:?}: the allowlist must be in parentheses"))?
                    .split_ascii_whitespace()
                    .map(str::to_owned)
                    .collect()
            };
            policy = policy.set(feature.trim(), allow);
        }
        policy.check()?;
        Ok(policy)
    }
}

/// The headers the layer manages, each with its own [`HeaderMode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum SecurityHeader {
    /// `Content-Security-Policy` (or `-Report-Only`).
    ContentSecurityPolicy,
    /// `Strict-Transport-Security`.
    StrictTransportSecurity,
    /// `X-Content-Type-Options: nosniff`.
    XContentTypeOptions,
    /// `X-Frame-Options`.
    XFrameOptions,
    /// `Referrer-Policy`.
    ReferrerPolicy,
    /// `Permissions-Policy`.
    PermissionsPolicy,
    /// `Cross-Origin-Opener-Policy`.
    CrossOriginOpenerPolicy,
    /// `Cross-Origin-Resource-Policy`.
    CrossOriginResourcePolicy,
    /// `Cross-Origin-Embedder-Policy` (only when a value is chosen).
    CrossOriginEmbedderPolicy,
    /// `Origin-Agent-Cluster: ?1`.
    OriginAgentCluster,
    /// `X-DNS-Prefetch-Control: off`.
    XDnsPrefetchControl,
    /// `X-Permitted-Cross-Domain-Policies: none`.
    XPermittedCrossDomainPolicies,
    /// `X-XSS-Protection`.
    XXssProtection,
    /// `Cache-Control: no-store` (only when turned on).
    CacheControl,
}

impl SecurityHeader {
    /// Every managed header.
    pub const ALL: [SecurityHeader; 14] = [
        SecurityHeader::ContentSecurityPolicy,
        SecurityHeader::StrictTransportSecurity,
        SecurityHeader::XContentTypeOptions,
        SecurityHeader::XFrameOptions,
        SecurityHeader::ReferrerPolicy,
        SecurityHeader::PermissionsPolicy,
        SecurityHeader::CrossOriginOpenerPolicy,
        SecurityHeader::CrossOriginResourcePolicy,
        SecurityHeader::CrossOriginEmbedderPolicy,
        SecurityHeader::OriginAgentCluster,
        SecurityHeader::XDnsPrefetchControl,
        SecurityHeader::XPermittedCrossDomainPolicies,
        SecurityHeader::XXssProtection,
        SecurityHeader::CacheControl,
    ];

    /// The header's name. For [`SecurityHeader::ContentSecurityPolicy`] this is the
    /// enforcing name; a report-only policy is sent under
    /// `Content-Security-Policy-Report-Only`.
    pub fn name(self) -> HeaderName {
        match self {
            SecurityHeader::ContentSecurityPolicy => header::CONTENT_SECURITY_POLICY,
            SecurityHeader::StrictTransportSecurity => header::STRICT_TRANSPORT_SECURITY,
            SecurityHeader::XContentTypeOptions => header::X_CONTENT_TYPE_OPTIONS,
            SecurityHeader::XFrameOptions => header::X_FRAME_OPTIONS,
            SecurityHeader::ReferrerPolicy => header::REFERRER_POLICY,
            SecurityHeader::PermissionsPolicy => HeaderName::from_static("permissions-policy"),
            SecurityHeader::CrossOriginOpenerPolicy => {
                HeaderName::from_static("cross-origin-opener-policy")
            }
            SecurityHeader::CrossOriginResourcePolicy => {
                HeaderName::from_static("cross-origin-resource-policy")
            }
            SecurityHeader::CrossOriginEmbedderPolicy => {
                HeaderName::from_static("cross-origin-embedder-policy")
            }
            SecurityHeader::OriginAgentCluster => HeaderName::from_static("origin-agent-cluster"),
            SecurityHeader::XDnsPrefetchControl => header::X_DNS_PREFETCH_CONTROL,
            SecurityHeader::XPermittedCrossDomainPolicies => {
                HeaderName::from_static("x-permitted-cross-domain-policies")
            }
            SecurityHeader::XXssProtection => header::X_XSS_PROTECTION,
            SecurityHeader::CacheControl => header::CACHE_CONTROL,
        }
    }

    /// The managed header called `name` (ASCII case-insensitive; the CSP report-only name
    /// is accepted too).
    pub fn from_name(name: &str) -> Option<SecurityHeader> {
        if name.eq_ignore_ascii_case("content-security-policy-report-only") {
            return Some(SecurityHeader::ContentSecurityPolicy);
        }
        SecurityHeader::ALL
            .into_iter()
            .find(|h| h.name().as_str().eq_ignore_ascii_case(name.trim()))
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for SecurityHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name().as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_parse_their_values_and_names() {
        assert_eq!("override".parse(), Ok(HeaderMode::Override));
        assert_eq!("if_not_present".parse(), Ok(HeaderMode::IfNotPresent));
        assert_eq!("OFF".parse(), Ok(HeaderMode::Off));
        assert_eq!("sameorigin".parse(), Ok(FrameOptions::SameOrigin));
        assert_eq!(
            "strict_origin_when_cross_origin".parse(),
            Ok(ReferrerPolicy::StrictOriginWhenCrossOrigin)
        );
        assert_eq!("1; mode=block".parse(), Ok(XssProtection::Block));
        let err = "maybe".parse::<HstsWhen>().unwrap_err();
        assert!(err.to_string().contains("auto, always, never"), "{err}");
        assert_eq!(
            serde_json::to_string(&CrossOriginResourcePolicy::SameSite).unwrap(),
            "\"same-site\""
        );
        let coep: CrossOriginEmbedderPolicy = serde_json::from_str("\"require-corp\"").unwrap();
        assert_eq!(coep, CrossOriginEmbedderPolicy::RequireCorp);
        assert!(serde_json::from_str::<CrossOriginOpenerPolicy>("\"nope\"").is_err());
    }

    #[test]
    fn hsts_renders_and_checks_preload() {
        assert_eq!(
            Hsts::default().to_string(),
            "max-age=63072000; includeSubDomains"
        );
        let preload = Hsts {
            preload: true,
            ..Hsts::default()
        };
        assert_eq!(
            preload.to_string(),
            "max-age=63072000; includeSubDomains; preload"
        );
        assert!(preload.validate().is_ok());
        let short = Hsts {
            max_age: Duration::from_secs(86_400),
            ..preload
        };
        assert!(
            short
                .validate()
                .unwrap_err()
                .to_string()
                .contains("one year")
        );
        let narrow = Hsts {
            include_subdomains: false,
            ..preload
        };
        assert!(
            narrow
                .validate()
                .unwrap_err()
                .to_string()
                .contains("includeSubDomains")
        );
        let plain = Hsts {
            max_age: Duration::from_secs(300),
            include_subdomains: false,
            preload: false,
        };
        assert_eq!(plain.to_string(), "max-age=300");
    }

    #[test]
    fn permissions_policy_denies_powerful_features() {
        let text = PermissionsPolicy::default().to_string();
        for feature in [
            "camera=()",
            "microphone=()",
            "geolocation=()",
            "payment=()",
            "usb=()",
        ] {
            assert!(text.contains(feature), "{text}");
        }
        assert!(PermissionsPolicy::default().validate().is_ok());
        assert!(
            "camera=(self), geolocation=*"
                .parse::<PermissionsPolicy>()
                .is_ok()
        );
        assert!("camera".parse::<PermissionsPolicy>().is_err());
        assert!("camera=self".parse::<PermissionsPolicy>().is_err());
        assert!("Camera=()".parse::<PermissionsPolicy>().is_err());
        assert!(
            "camera=(https://a.example)"
                .parse::<PermissionsPolicy>()
                .is_err()
        );
        assert!(
            PermissionsPolicy::empty()
                .allow_origins("camera", ["https://a.example; x"])
                .validate()
                .is_err()
        );
    }

    #[test]
    fn header_names_round_trip() {
        for h in SecurityHeader::ALL {
            assert_eq!(SecurityHeader::from_name(h.name().as_str()), Some(h));
            assert_eq!(SecurityHeader::ALL[h.index()], h);
        }
        assert_eq!(
            SecurityHeader::from_name("Content-Security-Policy-Report-Only"),
            Some(SecurityHeader::ContentSecurityPolicy)
        );
        assert_eq!(SecurityHeader::from_name("server"), None);
    }
}
