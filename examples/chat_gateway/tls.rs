//! Serving https (`PALISADE_GATEWAY_TLS_CERT` and `_KEY`, PEM files), so HSTS and browsers'
//! secure contexts can be tried locally: rustls, HTTP/1.1 and HTTP/2 by ALPN. The server
//! loop (`serve.rs`) is the one plain http uses, with the same graceful shutdown and header
//! deadline (which also bounds the handshake).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Loads a certificate chain and its private key (PEM) into a server configuration.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read certificates from {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} holds an invalid certificate: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    // ring, the provider this example compiles in (aws-lc-rs would need cmake and a C
    // toolchain on every machine that builds the crate's examples). rustls marks it
    // deprecated only because it lacks post-quantum key exchange.
    #[allow(deprecated)]
    let provider = tokio_rustls::rustls::crypto::ring::default_provider();
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not make a TLS identity: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Gives an HTTP/1.1 request that came over TLS the `https` scheme that HTTP/2 requests
/// carry, so the layers see it as https (HSTS is sent on https answers only).
pub async fn mark_https(mut req: axum::extract::Request) -> axum::extract::Request {
    if req.uri().scheme().is_none() {
        let authority = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .unwrap_or_else(|| http::uri::Authority::from_static("localhost"));
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTPS);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    req
}
