//! The builder of [`SecurityHeadersLayer`] and the compiled policy it shares with every
//! service it builds.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, header::Entry};

use super::csp::{ContentSecurityPolicy, CspError};
use super::layer::SecurityHeadersLayer;
use super::values::{
    CrossOriginEmbedderPolicy, CrossOriginOpenerPolicy, CrossOriginResourcePolicy, FrameOptions,
    HeaderMode, Hsts, HstsWhen, PermissionsPolicy, ReferrerPolicy, SecurityHeader, XssProtection,
};
use crate::config::Environment;

/// Fingerprinting headers removed by default: they tell an attacker which software (and
/// often which version) to target.
pub const DEFAULT_REMOVED_HEADERS: [&str; 8] = [
    "server",
    "x-powered-by",
    "x-aspnet-version",
    "x-aspnetmvc-version",
    "x-generator",
    "x-runtime",
    "x-backend-server",
    "x-version",
];

/// A mistake in the security headers configuration, found when the layer is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecurityHeadersConfigError {
    /// The Content-Security-Policy is invalid.
    #[error(transparent)]
    Csp(#[from] CspError),
    /// HSTS asks for the preload list without meeting its requirements.
    #[error("Strict-Transport-Security: {reason}")]
    HstsPreload {
        /// What is missing.
        reason: &'static str,
    },
    /// The Permissions-Policy is invalid.
    #[error("Permissions-Policy: {reason}")]
    PermissionsPolicy {
        /// What is wrong.
        reason: String,
    },
    /// A header to remove is not a valid header name.
    #[error("{name:?} is not a valid header name to remove")]
    InvalidHeaderName {
        /// The name as given.
        name: String,
    },
    /// A header to remove is one the layer itself sets.
    #[error(
        "{name} is set by the security headers layer; turn it off with its mode instead of removing it"
    )]
    RemovesManagedHeader {
        /// The header.
        name: String,
    },
    /// A value could not be made into a header value.
    #[error("{name}: the configured value is not a valid header value")]
    InvalidHeaderValue {
        /// The header.
        name: String,
    },
    /// A per-header mode names a header the layer does not manage.
    #[error("{name:?} is not a header managed by the security headers layer")]
    UnknownHeader {
        /// The name as given.
        name: String,
    },
}

/// Builds a [`SecurityHeadersLayer`]. Start from a preset ([`SecurityHeadersLayerBuilder::api`]
/// or [`SecurityHeadersLayerBuilder::web`]) and change what you need; every value is checked
/// and turned into a header value once, in [`SecurityHeadersLayerBuilder::build`].
#[derive(Debug, Clone)]
#[must_use]
pub struct SecurityHeadersLayerBuilder {
    pub(crate) default_mode: HeaderMode,
    pub(crate) modes: [Option<HeaderMode>; SecurityHeader::ALL.len()],
    pub(crate) csp: Option<ContentSecurityPolicy>,
    pub(crate) hsts: Hsts,
    pub(crate) hsts_when: HstsWhen,
    pub(crate) environment: Environment,
    pub(crate) trust_forwarded_proto: bool,
    pub(crate) frame_options: FrameOptions,
    pub(crate) referrer_policy: ReferrerPolicy,
    pub(crate) permissions_policy: PermissionsPolicy,
    pub(crate) coop: CrossOriginOpenerPolicy,
    pub(crate) corp: CrossOriginResourcePolicy,
    pub(crate) coep: Option<CrossOriginEmbedderPolicy>,
    pub(crate) xss_protection: XssProtection,
    pub(crate) cache_no_store: bool,
    pub(crate) remove: Vec<String>,
    pub(crate) errors: Vec<SecurityHeadersConfigError>,
}

impl Default for SecurityHeadersLayerBuilder {
    fn default() -> Self {
        Self::api()
    }
}

impl SecurityHeadersLayerBuilder {
    /// The preset for JSON APIs: `Content-Security-Policy: default-src 'none';
    /// frame-ancestors 'none'`, `Referrer-Policy: no-referrer`, and every other default.
    pub fn api() -> Self {
        Self {
            default_mode: HeaderMode::IfNotPresent,
            modes: [None; SecurityHeader::ALL.len()],
            csp: Some(ContentSecurityPolicy::api()),
            hsts: Hsts::default(),
            hsts_when: HstsWhen::Auto,
            environment: Environment::Development,
            trust_forwarded_proto: false,
            frame_options: FrameOptions::Deny,
            referrer_policy: ReferrerPolicy::NoReferrer,
            permissions_policy: PermissionsPolicy::deny_all(),
            coop: CrossOriginOpenerPolicy::SameOrigin,
            corp: CrossOriginResourcePolicy::SameOrigin,
            coep: None,
            xss_protection: XssProtection::Disabled,
            cache_no_store: false,
            remove: DEFAULT_REMOVED_HEADERS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            errors: Vec::new(),
        }
    }

    /// The preset for pages: [`ContentSecurityPolicy::web`] (with a fresh nonce per
    /// response), `Referrer-Policy: strict-origin-when-cross-origin`, and every other
    /// default.
    pub fn web() -> Self {
        Self {
            csp: Some(ContentSecurityPolicy::web()),
            referrer_policy: ReferrerPolicy::StrictOriginWhenCrossOrigin,
            ..Self::api()
        }
    }

    /// The mode of every header that has no mode of its own (default
    /// [`HeaderMode::IfNotPresent`]).
    pub fn mode(mut self, mode: HeaderMode) -> Self {
        self.default_mode = mode;
        self
    }

    /// The mode of one header.
    pub fn header_mode(mut self, header: SecurityHeader, mode: HeaderMode) -> Self {
        self.modes[header.index()] = Some(mode);
        self
    }

    /// The mode of the header called `name` (for configuration files); an unknown name is
    /// reported by [`build`](Self::build).
    pub fn header_mode_by_name(self, name: &str, mode: HeaderMode) -> Self {
        match SecurityHeader::from_name(name) {
            Some(header) => self.header_mode(header, mode),
            None => self.error(SecurityHeadersConfigError::UnknownHeader {
                name: name.to_owned(),
            }),
        }
    }

    /// The Content-Security-Policy (including report-only mode and nonces).
    pub fn csp(mut self, csp: ContentSecurityPolicy) -> Self {
        self.csp = Some(csp);
        self
    }

    /// Sends no Content-Security-Policy.
    pub fn no_csp(mut self) -> Self {
        self.csp = None;
        self
    }

    /// The HSTS policy (default `max-age=63072000; includeSubDomains`).
    pub fn hsts(mut self, hsts: Hsts) -> Self {
        self.hsts = hsts;
        self
    }

    /// When HSTS is sent (default [`HstsWhen::Auto`]: in production or over https).
    pub fn hsts_when(mut self, when: HstsWhen) -> Self {
        self.hsts_when = when;
        self
    }

    /// The environment; [`Environment::Production`] sends HSTS on every response under
    /// [`HstsWhen::Auto`].
    pub fn environment(mut self, environment: Environment) -> Self {
        self.environment = environment;
        self
    }

    /// Whether `X-Forwarded-Proto: https` (or, without it, RFC 7239 `Forwarded:
    /// proto=https`) counts as "the request came over https". The first element of the
    /// header is read. Turn it on only behind a proxy that sets (and strips) these headers.
    pub fn trust_forwarded_proto(mut self, trust: bool) -> Self {
        self.trust_forwarded_proto = trust;
        self
    }

    /// `X-Frame-Options` (default `DENY`).
    pub fn frame_options(mut self, value: FrameOptions) -> Self {
        self.frame_options = value;
        self
    }

    /// `Referrer-Policy`.
    pub fn referrer_policy(mut self, value: ReferrerPolicy) -> Self {
        self.referrer_policy = value;
        self
    }

    /// `Permissions-Policy` (default: [`PermissionsPolicy::deny_all`]).
    pub fn permissions_policy(mut self, value: PermissionsPolicy) -> Self {
        self.permissions_policy = value;
        self
    }

    /// `Cross-Origin-Opener-Policy` (default `same-origin`).
    pub fn cross_origin_opener_policy(mut self, value: CrossOriginOpenerPolicy) -> Self {
        self.coop = value;
        self
    }

    /// `Cross-Origin-Resource-Policy` (default `same-origin`).
    pub fn cross_origin_resource_policy(mut self, value: CrossOriginResourcePolicy) -> Self {
        self.corp = value;
        self
    }

    /// `Cross-Origin-Embedder-Policy` (default: not sent).
    pub fn cross_origin_embedder_policy(
        mut self,
        value: Option<CrossOriginEmbedderPolicy>,
    ) -> Self {
        self.coep = value;
        self
    }

    /// `X-XSS-Protection` (default `0`; see [`XssProtection`] for why `1; mode=block` is
    /// not recommended).
    pub fn xss_protection(mut self, value: XssProtection) -> Self {
        self.xss_protection = value;
        self
    }

    /// Sends `Cache-Control: no-store` (default off): for APIs whose answers must not be
    /// kept by browsers or shared caches.
    pub fn cache_control_no_store(mut self, on: bool) -> Self {
        self.cache_no_store = on;
        self
    }

    /// Adds a header to remove from every response.
    pub fn remove_header(mut self, name: &str) -> Self {
        let name = name.trim().to_ascii_lowercase();
        if !self.remove.contains(&name) {
            self.remove.push(name);
        }
        self
    }

    /// Keeps a header that would otherwise be removed (for example `server`).
    pub fn keep_header(mut self, name: &str) -> Self {
        self.remove.retain(|n| !n.eq_ignore_ascii_case(name.trim()));
        self
    }

    /// Replaces the whole list of headers to remove (an empty list removes nothing).
    pub fn remove_headers<I>(mut self, names: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.remove.clear();
        for name in names {
            self = self.remove_header(name.as_ref());
        }
        self
    }

    pub(crate) fn error(mut self, err: SecurityHeadersConfigError) -> Self {
        self.errors.push(err);
        self
    }

    fn mode_of(&self, header: SecurityHeader) -> HeaderMode {
        self.modes[header.index()].unwrap_or(self.default_mode)
    }

    /// Checks everything and builds the layer, or returns the first mistake.
    pub fn build(self) -> Result<SecurityHeadersLayer, SecurityHeadersConfigError> {
        Ok(SecurityHeadersLayer::from_policy(Arc::new(self.compile()?)))
    }

    pub(crate) fn compile(self) -> Result<Policy, SecurityHeadersConfigError> {
        if let Some(err) = self.errors.first() {
            return Err(err.clone());
        }
        self.hsts.validate()?;
        self.permissions_policy.validate()?;

        let mut remove = Vec::with_capacity(self.remove.len());
        for name in &self.remove {
            remove.push(check_removed_header(name)?);
        }

        let mut fixed = Vec::with_capacity(SecurityHeader::ALL.len());
        let mut csp_template = None;
        let mut hsts = None;
        for header in SecurityHeader::ALL {
            let overwrite = match self.mode_of(header) {
                HeaderMode::Off => continue,
                HeaderMode::Override => true,
                HeaderMode::IfNotPresent => false,
            };
            let value: HeaderValue = match header {
                SecurityHeader::ContentSecurityPolicy => {
                    let Some(csp) = &self.csp else { continue };
                    let parts = csp.template();
                    if parts.len() > 1 {
                        csp_template = Some(CspTemplate {
                            name: csp.header_name(),
                            len: parts.iter().map(String::len).sum::<usize>()
                                + (parts.len() - 1) * 24,
                            parts: parts.into_iter().map(String::into_boxed_str).collect(),
                            overwrite,
                        });
                        continue;
                    }
                    let value = static_or_owned(header, parts.concat())?;
                    fixed.push(Fixed {
                        name: csp.header_name(),
                        value,
                        overwrite,
                    });
                    continue;
                }
                SecurityHeader::StrictTransportSecurity => {
                    if self.hsts_when != HstsWhen::Never {
                        let value = if self.hsts == Hsts::default() {
                            HeaderValue::from_static("max-age=63072000; includeSubDomains")
                        } else {
                            owned_value(header, self.hsts.to_string())?
                        };
                        hsts = Some(Fixed {
                            name: header.name(),
                            value,
                            overwrite,
                        });
                    }
                    continue;
                }
                SecurityHeader::XContentTypeOptions => HeaderValue::from_static("nosniff"),
                SecurityHeader::XFrameOptions => {
                    HeaderValue::from_static(self.frame_options.as_str())
                }
                SecurityHeader::ReferrerPolicy => {
                    HeaderValue::from_static(self.referrer_policy.as_str())
                }
                SecurityHeader::PermissionsPolicy => {
                    if self.permissions_policy == PermissionsPolicy::empty() {
                        continue;
                    }
                    static_or_owned(header, self.permissions_policy.to_string())?
                }
                SecurityHeader::CrossOriginOpenerPolicy => {
                    HeaderValue::from_static(self.coop.as_str())
                }
                SecurityHeader::CrossOriginResourcePolicy => {
                    HeaderValue::from_static(self.corp.as_str())
                }
                SecurityHeader::CrossOriginEmbedderPolicy => match self.coep {
                    Some(coep) => HeaderValue::from_static(coep.as_str()),
                    None => continue,
                },
                SecurityHeader::OriginAgentCluster => HeaderValue::from_static("?1"),
                SecurityHeader::XDnsPrefetchControl => HeaderValue::from_static("off"),
                SecurityHeader::XPermittedCrossDomainPolicies => HeaderValue::from_static("none"),
                SecurityHeader::XXssProtection => {
                    HeaderValue::from_static(self.xss_protection.as_str())
                }
                SecurityHeader::CacheControl => {
                    if !self.cache_no_store {
                        continue;
                    }
                    HeaderValue::from_static("no-store")
                }
            };
            fixed.push(Fixed {
                name: header.name(),
                value,
                overwrite,
            });
        }
        let hsts_always = match self.hsts_when {
            HstsWhen::Always => true,
            HstsWhen::Auto => self.environment.is_production(),
            HstsWhen::Never => false,
        };
        Ok(Policy::new(
            fixed.into_boxed_slice(),
            remove.into_boxed_slice(),
            hsts,
            hsts_always,
            self.trust_forwarded_proto,
            csp_template,
        ))
    }
}

/// Checks a header to remove: a valid name, and not one the layer sets itself.
pub(crate) fn check_removed_header(name: &str) -> Result<HeaderName, SecurityHeadersConfigError> {
    let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        SecurityHeadersConfigError::InvalidHeaderName {
            name: name.to_owned(),
        }
    })?;
    if SecurityHeader::from_name(name).is_some() {
        return Err(SecurityHeadersConfigError::RemovesManagedHeader {
            name: name.to_owned(),
        });
    }
    Ok(header)
}

/// Values of the presets, kept as `&'static str` so that copying them into a response is
/// free (an owned value costs an atomic reference count per copy).
pub(crate) const STATIC_VALUES: [&str; 2] = [
    "default-src 'none'; frame-ancestors 'none'",
    "accelerometer=(), autoplay=(), bluetooth=(), camera=(), display-capture=(), \
     encrypted-media=(), fullscreen=(), geolocation=(), gyroscope=(), hid=(), \
     idle-detection=(), magnetometer=(), microphone=(), midi=(), payment=(), \
     picture-in-picture=(), publickey-credentials-get=(), screen-wake-lock=(), serial=(), \
     usb=(), web-share=(), xr-spatial-tracking=()",
];

fn static_or_owned(
    header: SecurityHeader,
    text: String,
) -> Result<HeaderValue, SecurityHeadersConfigError> {
    match STATIC_VALUES.iter().find(|s| **s == text) {
        Some(s) => Ok(HeaderValue::from_static(s)),
        None => owned_value(header, text),
    }
}

fn owned_value(
    header: SecurityHeader,
    text: String,
) -> Result<HeaderValue, SecurityHeadersConfigError> {
    // Values are made of validated parts, so this does not fail in practice; it stays a
    // typed error rather than a panic all the same.
    HeaderValue::try_from(text).map_err(|_| SecurityHeadersConfigError::InvalidHeaderValue {
        name: header.to_string(),
    })
}

/// One header with its value, built once.
#[derive(Debug)]
pub(crate) struct Fixed {
    pub(crate) name: HeaderName,
    pub(crate) value: HeaderValue,
    pub(crate) overwrite: bool,
}

impl Fixed {
    #[inline]
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        apply(headers, &self.name, self.value.clone(), self.overwrite);
    }
}

/// Sets one of the layer's headers: replacing the handler's values (`overwrite`) or only
/// where the handler sent none.
///
/// A header map holds at most 24,576 names and panics when a full one is asked to take
/// another; a response that full keeps the layer's overriding values (in place of the
/// handler's), and the other headers of the layer that no longer fit are left out.
#[inline]
pub(crate) fn apply(
    headers: &mut HeaderMap,
    name: &HeaderName,
    value: HeaderValue,
    overwrite: bool,
) {
    match headers.try_entry(name) {
        Ok(Entry::Occupied(mut slot)) => {
            if overwrite {
                slot.insert(value);
            }
        }
        Ok(Entry::Vacant(slot)) => {
            let _ = slot.try_insert(value);
        }
        // The map is full: removing the handler's values makes room for the layer's.
        Err(_) => {
            if overwrite && headers.remove(name).is_some() {
                let _ = headers.try_insert(name.clone(), value);
            }
        }
    }
}

/// A CSP whose value holds a per-request nonce: `parts` joined by the nonce.
#[derive(Debug)]
pub(crate) struct CspTemplate {
    pub(crate) name: HeaderName,
    pub(crate) parts: Box<[Box<str>]>,
    pub(crate) len: usize,
    pub(crate) overwrite: bool,
}

impl CspTemplate {
    /// The header value for one nonce: one allocation of the exact size.
    pub(crate) fn render(&self, nonce: &str) -> HeaderValue {
        let mut buf = bytes::BytesMut::with_capacity(self.len);
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                buf.extend_from_slice(nonce.as_bytes());
            }
            buf.extend_from_slice(part.as_bytes());
        }
        // The parts were validated when the policy was built and the nonce is base64, so
        // this cannot fail; fall back to a policy that blocks everything rather than panic.
        HeaderValue::from_maybe_shared(buf.freeze())
            .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
    }
}

/// Up to this many response headers, the layer starts from its prebuilt map and moves the
/// handler's headers in; larger maps are edited in place. Moving a header in costs more
/// than setting one of the layer's in place, after the copy of the prebuilt map: with the
/// dozen headers of a preset, the two cost the same at about eight.
const MERGE_LIMIT: usize = 8;

/// What happens to one of the handler's headers when it is moved into the prebuilt map.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Dropped: removed (fingerprinting) or replaced by the layer's value.
    Drop,
    /// Replaces the layer's value (the first of its values; the rest are appended).
    Replace,
    /// Kept beside the layer's headers.
    Keep,
}

/// A set of header names that answers "certainly not in the set" with one bit: a bit per
/// fingerprint (length, last and middle byte) of the names added. A name whose bit is set
/// may be in the set, and is then compared with each name.
#[derive(Debug, Default)]
pub(crate) struct NameFilter {
    bits: [u64; 4],
}

impl NameFilter {
    #[inline]
    fn fingerprint(name: &HeaderName) -> u8 {
        let bytes = name.as_str().as_bytes();
        let len = bytes.len();
        // A header name is never empty; `unwrap_or` keeps this total all the same.
        let last = bytes.last().copied().unwrap_or(0);
        let middle = bytes.get(len / 2).copied().unwrap_or(0);
        (len as u8)
            .wrapping_mul(37)
            .wrapping_add(last.wrapping_mul(5))
            .wrapping_add(middle)
    }

    pub(crate) fn add(&mut self, name: &HeaderName) {
        let f = Self::fingerprint(name);
        self.bits[usize::from(f >> 6)] |= 1 << (f & 63);
    }

    /// `false` when `name` was certainly never added.
    #[inline]
    pub(crate) fn may_hold(&self, name: &HeaderName) -> bool {
        let f = Self::fingerprint(name);
        self.bits[usize::from(f >> 6)] & (1 << (f & 63)) != 0
    }
}

/// Everything the layer applies, built once and shared.
#[derive(Debug)]
pub(crate) struct Policy {
    pub(crate) fixed: Box<[Fixed]>,
    pub(crate) remove: Box<[HeaderName]>,
    pub(crate) hsts: Option<Fixed>,
    pub(crate) hsts_always: bool,
    pub(crate) trust_forwarded_proto: bool,
    pub(crate) csp_template: Option<CspTemplate>,
    /// The fixed headers as a ready map, without and with HSTS.
    pub(crate) base: HeaderMap,
    pub(crate) base_hsts: HeaderMap,
    /// Every name the policy removes or sets, for a quick "not one of ours".
    pub(crate) managed: NameFilter,
    /// The names in `remove`.
    pub(crate) removed: NameFilter,
}

impl Policy {
    pub(crate) fn new(
        fixed: Box<[Fixed]>,
        remove: Box<[HeaderName]>,
        hsts: Option<Fixed>,
        hsts_always: bool,
        trust_forwarded_proto: bool,
        csp_template: Option<CspTemplate>,
    ) -> Self {
        let mut base = HeaderMap::with_capacity(fixed.len() + 4);
        for f in fixed.iter() {
            base.insert(f.name.clone(), f.value.clone());
        }
        let mut base_hsts = base.clone();
        if let Some(f) = &hsts {
            base_hsts.insert(f.name.clone(), f.value.clone());
        }
        let mut removed = NameFilter::default();
        remove.iter().for_each(|name| removed.add(name));
        let mut managed = NameFilter::default();
        for name in remove
            .iter()
            .chain(fixed.iter().map(|f| &f.name))
            .chain(hsts.iter().map(|f| &f.name))
        {
            managed.add(name);
        }
        Self {
            fixed,
            remove,
            hsts,
            hsts_always,
            trust_forwarded_proto,
            csp_template,
            base,
            base_hsts,
            managed,
            removed,
        }
    }

    /// Whether HSTS goes on the response to this request.
    pub(crate) fn wants_hsts<B>(&self, req: &http::Request<B>) -> bool {
        if self.hsts.is_none() {
            return false;
        }
        if self.hsts_always || req.uri().scheme() == Some(&http::uri::Scheme::HTTPS) {
            return true;
        }
        if !self.trust_forwarded_proto {
            return false;
        }
        // The first element is what the proxy nearest the client saw.
        let first = |name: http::header::HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
        };
        if let Some(proto) = first(HeaderName::from_static("x-forwarded-proto")) {
            return proto.trim().eq_ignore_ascii_case("https");
        }
        // RFC 7239: `Forwarded: for=192.0.2.60;proto=https;by=203.0.113.43`.
        first(http::header::FORWARDED).is_some_and(|element| {
            element.split(';').any(|pair| {
                pair.split_once('=').is_some_and(|(key, value)| {
                    key.trim().eq_ignore_ascii_case("proto")
                        && value.trim().trim_matches('"').eq_ignore_ascii_case("https")
                })
            })
        })
    }

    /// Applies the policy to a response's headers.
    #[inline]
    pub(crate) fn apply(&self, headers: &mut HeaderMap, hsts: bool, csp: Option<HeaderValue>) {
        if headers.len() <= MERGE_LIMIT {
            self.apply_by_merge(headers, hsts);
        } else {
            self.apply_in_place(headers, hsts);
        }
        if let (Some(value), Some(template)) = (csp, &self.csp_template) {
            apply(headers, &template.name, value, template.overwrite);
        }
    }

    /// The fate of a handler's header under this policy.
    #[inline]
    fn fate(&self, name: &HeaderName, hsts: bool) -> Fate {
        // Most of a handler's headers are neither removed nor set by the layer: one bit
        // says so without comparing the name with every managed one.
        if !self.managed.may_hold(name) {
            return Fate::Keep;
        }
        if self.remove.iter().any(|r| r == name) {
            return Fate::Drop;
        }
        let ours = self
            .fixed
            .iter()
            .chain(self.hsts.iter().filter(|_| hsts))
            .find(|f| f.name == *name);
        match ours {
            Some(f) if f.overwrite => Fate::Drop,
            Some(_) => Fate::Replace,
            None => Fate::Keep,
        }
    }

    /// Starts from a clone of the prebuilt map (no hashing of the layer's names) and moves
    /// the handler's few headers into it: each name is hashed once, its further values
    /// follow through the same entry.
    pub(crate) fn apply_by_merge(&self, headers: &mut HeaderMap, hsts: bool) {
        let base = if hsts && self.hsts.is_some() {
            &self.base_hsts
        } else {
            &self.base
        };
        // (Reserving room for the handler's headers first measured slower than letting
        // the map grow as they go in.)
        let mut theirs = std::mem::replace(headers, base.clone()).into_iter();
        // A map's iterator names the first value of each header and leaves the name out
        // (`None`) for the values that follow it.
        let (mut name, mut value) = match theirs.next() {
            Some((Some(name), value)) => (name, value),
            _ => return,
        };
        loop {
            let mut entry = match self.fate(&name, hsts) {
                Fate::Drop => None,
                Fate::Replace | Fate::Keep => Some(match headers.entry(name) {
                    // Only the layer's own headers are in the map so far: the handler's
                    // value takes the place of the layer's (if-not-present).
                    Entry::Occupied(mut slot) => {
                        slot.insert(value);
                        slot
                    }
                    Entry::Vacant(slot) => slot.insert_entry(value),
                }),
            };
            loop {
                match theirs.next() {
                    Some((Some(next), next_value)) => {
                        name = next;
                        value = next_value;
                        break;
                    }
                    Some((None, more)) => {
                        if let Some(entry) = &mut entry {
                            entry.append(more);
                        }
                    }
                    None => return,
                }
            }
        }
    }

    /// Removes and inserts in the response's own map.
    pub(crate) fn apply_in_place(&self, headers: &mut HeaderMap, hsts: bool) {
        // One pass over the response's names finds whether it holds any to remove, where
        // removing each by name would hash every one of them.
        if headers
            .keys()
            .any(|k| self.removed.may_hold(k) && self.remove.contains(k))
        {
            for name in self.remove.iter() {
                headers.remove(name);
            }
        }
        // One growth of the map instead of several while the headers go in. A map near its
        // size limit grows (or not) as each insert needs (see [`apply`]).
        let _ = headers.try_reserve(self.fixed.len() + 2);
        for fixed in self.fixed.iter() {
            fixed.apply(headers);
        }
        if hsts {
            if let Some(fixed) = &self.hsts {
                fixed.apply(headers);
            }
        }
    }
}
