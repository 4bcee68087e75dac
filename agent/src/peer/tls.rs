//! Mutual TLS for the agent API and the witness: every party presents a
//! certificate signed by the cluster CA from `gemin_k8s init`.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::Tls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what}: {source}")]
    Read {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} holds no usable PEM {kind}: {detail}")]
    Pem { what: &'static str, kind: &'static str, detail: String },
    #[error("building the TLS configuration: {0}")]
    Config(String),
}

/// The CA, this party's certificate chain and its key.
#[derive(Debug)]
pub struct TlsMaterial {
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem { what, kind: "certificate", detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what, kind: "certificate", detail: "no CERTIFICATE block".into() });
    }
    Ok(certs)
}

fn roots(ca: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs("the CA certificate", ca)? {
        roots.add(c).map_err(|e| TlsError::Pem {
            what: "the CA certificate",
            kind: "certificate",
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

impl TlsMaterial {
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        crate::tls::install_crypto_provider();
        let roots = roots(ca)?;
        let chain = certs("the certificate", cert)?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| TlsError::Pem {
            what: "the key",
            kind: "private key",
            detail: e.to_string(),
        })?;
        Ok(TlsMaterial { roots, chain, key })
    }

    /// From the `tls:` block (inline PEM or paths).
    pub fn from_config(tls: &Tls) -> Result<Self, TlsError> {
        let read = |what, v: &str| Tls::resolve(v).map_err(|source| TlsError::Read { what, source });
        Self::from_pem(&read("tls.ca", &tls.ca)?, &read("tls.cert", &tls.cert)?, &read("tls.key", &tls.key)?)
    }

    /// Server side: a client certificate signed by the CA is required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder(Arc::new(self.roots.clone()))
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Client side: trusts only the CA, presents our certificate.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let mut config = ClientConfig::builder()
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// An HTTP client for the agent API or the witness, with a per-request timeout.
    pub fn http_client(&self, timeout: std::time::Duration) -> Result<reqwest::Client, TlsError> {
        reqwest::Client::builder()
            .use_preconfigured_tls(self.client_config()?)
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            // After a silent cut TCP backs its retransmissions off for up to
            // two minutes, and every request queued on the pooled connection
            // times out meanwhile: drop a connection whose data stays
            // unacknowledged, so the next request opens a new one.
            .tcp_user_timeout((timeout * 2).max(std::time::Duration::from_secs(1)))
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))
    }
}
