//! [`CspBuilder`]: builds a [`ContentSecurityPolicy`], checking every source.

use super::directive::Directive;
use super::error::CspError;
use super::policy::ContentSecurityPolicy;
use super::source::Source;

/// Builds a [`ContentSecurityPolicy`]; mistakes are reported by [`CspBuilder::build`].
#[derive(Debug, Clone)]
#[must_use]
pub struct CspBuilder {
    policy: ContentSecurityPolicy,
    errors: Vec<CspError>,
}

impl Default for CspBuilder {
    fn default() -> Self {
        Self {
            policy: ContentSecurityPolicy {
                directives: Vec::new(),
                upgrade_insecure_requests: false,
                sandbox: None,
                report_uri: Vec::new(),
                report_to: None,
                report_only: false,
                nonce: false,
            },
            errors: Vec::new(),
        }
    }
}

macro_rules! directive_methods {
    ($($(#[$doc:meta])* $method:ident => $directive:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $method<I>(self, sources: I) -> Self
            where
                I: IntoIterator,
                I::Item: AsRef<str>,
            {
                self.directive(Directive::$directive, sources)
            }
        )*
    };
}

impl CspBuilder {
    /// A builder starting from `policy`.
    pub(super) fn from_policy(policy: ContentSecurityPolicy) -> Self {
        Self {
            policy,
            errors: Vec::new(),
        }
    }

    /// Sets `directive` to `sources` (replacing it if already set). Each source is a
    /// [`Source`] or a string such as `"'self'"` or `"https://cdn.example.com"`.
    pub fn directive<I>(mut self, directive: Directive, sources: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut parsed = Vec::new();
        for source in sources {
            match Source::parse_for(directive.name(), source.as_ref()) {
                Ok(s) => parsed.push(s),
                Err(e) => self.errors.push(e),
            }
        }
        if parsed.is_empty() && self.errors.is_empty() {
            self.errors.push(CspError::EmptySourceList {
                directive: directive.name().to_owned(),
            });
        }
        if parsed.len() > 1 && parsed.iter().any(Source::is_none) {
            self.errors.push(CspError::NoneWithOtherSources {
                directive: directive.name().to_owned(),
            });
        }
        let list = &mut self.policy.directives;
        match list.iter_mut().find(|(d, _)| *d == directive) {
            Some(slot) => slot.1 = parsed,
            None => {
                list.push((directive, parsed));
                list.sort_by_key(|(d, _)| *d);
            }
        }
        self
    }

    /// Removes `directive` from the policy.
    pub fn remove(mut self, directive: Directive) -> Self {
        self.policy.directives.retain(|(d, _)| *d != directive);
        self
    }

    directive_methods! {
        /// Sets `default-src`.
        default_src => DefaultSrc;
        /// Sets `script-src`.
        script_src => ScriptSrc;
        /// Sets `style-src`.
        style_src => StyleSrc;
        /// Sets `img-src`.
        img_src => ImgSrc;
        /// Sets `font-src`.
        font_src => FontSrc;
        /// Sets `connect-src`.
        connect_src => ConnectSrc;
        /// Sets `object-src`.
        object_src => ObjectSrc;
        /// Sets `frame-src`.
        frame_src => FrameSrc;
        /// Sets `worker-src`.
        worker_src => WorkerSrc;
        /// Sets `base-uri`.
        base_uri => BaseUri;
        /// Sets `form-action`.
        form_action => FormAction;
        /// Sets `frame-ancestors`.
        frame_ancestors => FrameAncestors;
    }

    /// Adds `upgrade-insecure-requests` (browsers fetch http subresources over https).
    pub fn upgrade_insecure_requests(mut self, on: bool) -> Self {
        self.policy.upgrade_insecure_requests = on;
        self
    }

    /// Adds `sandbox` with the given `allow-*` tokens (none: the strictest sandbox).
    pub fn sandbox<I>(mut self, tokens: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut list = Vec::new();
        for token in tokens {
            let token = token.as_ref();
            let valid = token.len() > "allow-".len()
                && token.starts_with("allow-")
                && token.bytes().all(|b| b.is_ascii_lowercase() || b == b'-');
            if valid {
                list.push(token.to_owned());
            } else {
                self.errors.push(CspError::InvalidSandboxToken {
                    value: token.to_owned(),
                });
            }
        }
        self.policy.sandbox = Some(list);
        self
    }

    /// Adds a `report-uri` (deprecated by browsers in favour of `report-to`, but still the
    /// one most of them honour): an absolute `http(s)://` URL or a path starting with `/`.
    pub fn report_uri(mut self, uri: impl AsRef<str>) -> Self {
        let uri = uri.as_ref();
        match check_report_uri(uri) {
            Ok(()) => self.policy.report_uri.push(uri.to_owned()),
            Err(err) => self.errors.push(err),
        }
        self
    }

    /// Sets `report-to` to a Reporting API group name (declared in a `Reporting-Endpoints`
    /// header that the application sends).
    pub fn report_to(mut self, group: impl AsRef<str>) -> Self {
        let group = group.as_ref();
        match check_report_to(group) {
            Ok(()) => self.policy.report_to = Some(group.to_owned()),
            Err(err) => self.errors.push(err),
        }
        self
    }

    /// Sends the policy as `Content-Security-Policy-Report-Only`: browsers report
    /// violations but block nothing. Useful to try a policy before enforcing it.
    pub fn report_only(mut self, on: bool) -> Self {
        self.policy.report_only = on;
        self
    }

    /// Adds a fresh random nonce (128 bits) to `script-src` and `style-src` on every
    /// response, and puts it in the request extensions as a [`CspNonce`](super::CspNonce) for handlers to
    /// write into `<script nonce="…">`.
    ///
    /// A missing `script-src` or `style-src` is created from `default-src` (without
    /// `'none'`), so the policy allows exactly what it did before plus nonced elements.
    pub fn nonce(mut self, on: bool) -> Self {
        self.policy.nonce = on;
        self
    }

    /// Validates and returns the policy, or the first mistake found.
    pub fn build(mut self) -> Result<ContentSecurityPolicy, CspError> {
        if let Some(err) = self.errors.into_iter().next() {
            return Err(err);
        }
        let policy = &mut self.policy;
        if policy.directives.is_empty()
            && !policy.upgrade_insecure_requests
            && policy.sandbox.is_none()
        {
            return Err(CspError::Empty);
        }
        if policy.nonce {
            let fallback: Vec<Source> = policy
                .sources(Directive::DefaultSrc)
                .unwrap_or_default()
                .iter()
                .filter(|s| !s.is_none())
                .cloned()
                .collect();
            for target in [Directive::ScriptSrc, Directive::StyleSrc] {
                match policy.directives.iter_mut().find(|(d, _)| *d == target) {
                    // A nonce next to 'none' would be ignored by browsers; the nonce
                    // replaces it.
                    Some((_, sources)) => sources.retain(|s| !s.is_none()),
                    None => policy.directives.push((target, fallback.clone())),
                }
            }
            policy.directives.sort_by_key(|(d, _)| *d);
        }
        Ok(self.policy)
    }
}

/// Checks a `report-uri`: an absolute `http(s)://` URL or a path starting with `/`.
pub(crate) fn check_report_uri(uri: &str) -> Result<(), CspError> {
    let scheme_ok = uri.starts_with('/') && !uri.starts_with("//")
        || uri.starts_with("https://")
        || uri.starts_with("http://");
    let chars_ok = uri
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'\'' | b'"'));
    if scheme_ok && chars_ok && uri.parse::<http::Uri>().is_ok() {
        Ok(())
    } else {
        Err(CspError::InvalidReportUri {
            value: uri.to_owned(),
        })
    }
}

/// Checks a `report-to` group name: letters, digits, `-`, `_` and `.`.
pub(crate) fn check_report_to(group: &str) -> Result<(), CspError> {
    if !group.is_empty()
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Ok(())
    } else {
        Err(CspError::InvalidReportTo {
            value: group.to_owned(),
        })
    }
}
