//! [`Directive`]: the CSP directives that take a source list.

use std::fmt;

/// A CSP directive that takes a source list (fetch, document and navigation directives).
///
/// `upgrade-insecure-requests`, `sandbox`, `report-uri` and `report-to` have their own
/// builder methods because they do not take sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Directive {
    /// `default-src`: the fallback for every other fetch directive.
    DefaultSrc,
    /// `script-src`.
    ScriptSrc,
    /// `script-src-elem`.
    ScriptSrcElem,
    /// `script-src-attr`.
    ScriptSrcAttr,
    /// `style-src`.
    StyleSrc,
    /// `style-src-elem`.
    StyleSrcElem,
    /// `style-src-attr`.
    StyleSrcAttr,
    /// `img-src`.
    ImgSrc,
    /// `font-src`.
    FontSrc,
    /// `connect-src`.
    ConnectSrc,
    /// `media-src`.
    MediaSrc,
    /// `object-src`.
    ObjectSrc,
    /// `frame-src`.
    FrameSrc,
    /// `child-src`.
    ChildSrc,
    /// `worker-src`.
    WorkerSrc,
    /// `manifest-src`.
    ManifestSrc,
    /// `base-uri`.
    BaseUri,
    /// `form-action`.
    FormAction,
    /// `frame-ancestors`: who may embed the page (the modern X-Frame-Options).
    FrameAncestors,
}

impl Directive {
    /// Every directive, in the order they are written in a policy.
    pub const ALL: [Directive; 19] = [
        Directive::DefaultSrc,
        Directive::ScriptSrc,
        Directive::ScriptSrcElem,
        Directive::ScriptSrcAttr,
        Directive::StyleSrc,
        Directive::StyleSrcElem,
        Directive::StyleSrcAttr,
        Directive::ImgSrc,
        Directive::FontSrc,
        Directive::ConnectSrc,
        Directive::MediaSrc,
        Directive::ObjectSrc,
        Directive::FrameSrc,
        Directive::ChildSrc,
        Directive::WorkerSrc,
        Directive::ManifestSrc,
        Directive::BaseUri,
        Directive::FormAction,
        Directive::FrameAncestors,
    ];

    /// The directive's name as written in the header (`script-src`).
    pub const fn name(self) -> &'static str {
        match self {
            Directive::DefaultSrc => "default-src",
            Directive::ScriptSrc => "script-src",
            Directive::ScriptSrcElem => "script-src-elem",
            Directive::ScriptSrcAttr => "script-src-attr",
            Directive::StyleSrc => "style-src",
            Directive::StyleSrcElem => "style-src-elem",
            Directive::StyleSrcAttr => "style-src-attr",
            Directive::ImgSrc => "img-src",
            Directive::FontSrc => "font-src",
            Directive::ConnectSrc => "connect-src",
            Directive::MediaSrc => "media-src",
            Directive::ObjectSrc => "object-src",
            Directive::FrameSrc => "frame-src",
            Directive::ChildSrc => "child-src",
            Directive::WorkerSrc => "worker-src",
            Directive::ManifestSrc => "manifest-src",
            Directive::BaseUri => "base-uri",
            Directive::FormAction => "form-action",
            Directive::FrameAncestors => "frame-ancestors",
        }
    }

    /// The directive named `name` (ASCII case-insensitive), if it takes a source list.
    pub fn from_name(name: &str) -> Option<Directive> {
        Directive::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for Directive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
